"""Export a served causal LM to ONNX with its KV cache as explicit inputs and outputs.

    lmforge export-onnx MODEL OUT_DIR      (MODEL: a model directory or models:/NAME@ALIAS)

The graph is one decoder step of any length: ``input_ids``, ``attention_mask`` and ``position_ids``
plus ``past_key_{i}``/``past_value_{i}`` per layer go in; ``logits`` (every input column) and
``present_key_{i}``/``present_value_{i}`` (past and new columns) come out. Batch, sequence and past
length are dynamic axes, so one graph serves prefill (past length 0) and decode (sequence 1) for the
dense, left-padded cache of ``backends/hf.py``'s ``DecodeBatch``. OUT_DIR receives ``model.onnx``
(weights in ``model.onnx.data``), the config, generation config and tokenizer, and
``onnx_model.json`` naming inputs, outputs and the logits difference to PyTorch measured right
after export. ``lmforge serve OUT_DIR`` then serves it through ONNX Runtime
(``model/onnx_model.py`` loads it, ``backends/onnx.py`` batches it).

The exporter is ``torch.onnx.export(dynamo=True)`` (``torch.export`` then onnxscript), the one
PyTorch maintains; the TorchScript exporter is deprecated and records one traced path.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import DynamicCache

from lmforge.core.errors import ServingError
from lmforge.serving.adapters.virtual_tokens import prefix_of
from lmforge.serving.backends.hf import check_cache_support
from lmforge.serving.model.hf_forward import cache_kwarg, hf_forward
from lmforge.serving.model.loading import load_model
from lmforge.serving.model.onnx_model import INSTALL_FIX, SPEC_FILE, SPEC_FORMAT, io_names, new_session
from lmforge.serving.model.types import FilledCacheLayer, ServedModel

log = logging.getLogger(__name__)

# fp32 PyTorch and ONNX Runtime differ only in the order of floating-point sums (~1e-6 here); a
# difference beyond this fraction of the largest logit means the graph computes something else.
CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OnnxExport:
    out_dir: Path
    architecture: str
    layers: int
    max_abs_logit_diff: float
    onnx_mb: float

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out_dir": str(self.out_dir)}


class _DecoderStep(torch.nn.Module):
    """The model's forward with the cache as plain tensors, the shape ``torch.export`` can trace."""

    def __init__(self, model: ServedModel, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=0, **{cache_kwarg(type(self.model)): cache})
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def example_inputs(model: ServedModel, batch: int, past: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A left-padded batch (row 0 padded) with a random past of ``past`` columns, as the graph takes it."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, : (past + seq) // 2] = 0  # a padded row, so the graph keeps the general masking path
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    probe = DynamicCache(config=model.config)
    with torch.inference_mode():  # one real step tells each layer's key/value shape, whatever the architecture
        hf_forward(model, ids[:, :1], mask[:, :1], positions[:, :1], probe)
    shapes = [(layer.keys.shape, layer.values.shape) for layer in cast(list[FilledCacheLayer], probe.layers)]
    cache = []
    for key_shape, value_shape in shapes:
        cache += [torch.randn(batch, key_shape[1], past, key_shape[3], generator=gen),
                  torch.randn(batch, value_shape[1], past, value_shape[3], generator=gen)]
    return (ids, mask, positions, *cache)


def export_onnx(model_dir: Path, out_dir: Path, opset: int | None = None) -> OnnxExport:
    """Export ``model_dir`` (a served model directory) to ``out_dir``; see the module docstring."""
    _require_packages()
    if (out_dir / "model.safetensors").exists() or out_dir.resolve() == Path(model_dir).resolve():
        # `lmforge serve` prefers model.onnx in a directory: an export here would shadow the weights.
        raise ServingError(f"{out_dir} holds PyTorch weights", "export into a new or empty directory")
    model, tokenizer = load_model(Path(model_dir), device="cpu")
    if not isinstance(model, torch.nn.Module):
        raise ServingError(f"{model_dir} is already an ONNX export", "pass the PyTorch model directory it came from")
    check_cache_support(model)
    if prefix_of(model) is not None:  # the engine places these in its cache; the graph would not see them
        raise ServingError(f"{model_dir} carries a prompt-learning adapter, which the ONNX graph cannot hold",
                           "serve this model with the PyTorch engine (`lmforge serve MODEL`)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SPEC_FILE).unlink(missing_ok=True)  # written last: without it a half-done export is not served
    onnx_path = out_dir / "model.onnx"
    example = example_inputs(model, batch=3, past=5, seq=4)
    layers = (len(example) - 3) // 2
    step = _DecoderStep(model, layers).eval()
    _export(step, example, onnx_path, layers, opset)
    import onnx

    onnx.checker.check_model(str(onnx_path))  # by path: the weights are external data
    diff = _check(step, onnx_path, layers, model)
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    spec = _spec(onnx_path, model, layers, diff, Path(model_dir))
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.glob("model.onnx*")) / 2**20
    return OnnxExport(out_dir, type(model).__name__, layers, diff, round(size, 3))


def _require_packages() -> None:
    try:
        import onnx  # noqa: F401 - imported to check that it is installed
        import onnxruntime  # noqa: F401 - likewise
        import onnxscript  # noqa: F401 - likewise
    except ImportError as exc:
        raise ServingError(f"ONNX export needs onnx, onnxruntime and onnxscript ({exc})", INSTALL_FIX) from exc


def _export(step: _DecoderStep, example: tuple, path: Path, layers: int, opset: int | None) -> None:
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past"), Dim("total")
    cache_axes = tuple({0: batch, 2: past} for _ in range(2 * layers))
    inputs, outputs = io_names(layers)
    # The exporter warns about its own internals (axis renames, deprecated pytree specs, torchvision ops it
    # skips): noise to a user.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            torch.onnx.export(step, example, str(path), input_names=inputs, output_names=outputs,
                              opset_version=opset, dynamo=True, external_data=True, verbose=False,
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache_axes))
        except Exception as exc:
            raise ServingError(
                f"torch.onnx.export cannot export {type(step.model).__name__}: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:300]}",
                "serve this model with the PyTorch engine (`lmforge serve MODEL`); ONNX export is tested for "
                "Llama, GPT-2, Qwen2, GPT-NeoX, Phi-3, Gemma, Mistral and OPT models",
            ) from exc
        finally:
            registry_log.setLevel(level)


def _check(step: _DecoderStep, path: Path, layers: int, model: ServedModel) -> float:
    """Largest |logit| difference between ONNX Runtime and PyTorch on a fresh padded decode input."""
    example = example_inputs(model, batch=2, past=6, seq=1, seed=1)
    with torch.inference_mode():
        expected = step(*example)[0]
    inputs, _ = io_names(layers)
    got = new_session(path, threads=None).run(["logits"], {n: t.numpy() for n, t in zip(inputs, example)})[0]
    diff = float((torch.from_numpy(got) - expected).abs().max())
    if not diff <= CHECK_TOLERANCE * max(1.0, float(expected.abs().max())):
        raise ServingError(f"the exported graph's logits differ from PyTorch's by {diff:.3g}",
                           "serve this model with the PyTorch engine (`lmforge serve MODEL`) and report the model "
                           "architecture; the export is not faithful")
    return diff


def _spec(path: Path, model: ServedModel, layers: int, diff: float, source: Path) -> dict[str, Any]:
    """What ``onnx_model.json`` records: names, dtypes and shapes read back from the saved graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph

    def describe(values) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {"format": SPEC_FORMAT, "source": str(source), "architecture": type(model).__name__, "layers": layers,
            "vocab_size": int(model.config.vocab_size), "opset": opsets.get("ai.onnx"), "torch": torch.__version__,
            "inputs": describe(graph.input), "outputs": describe(graph.output),
            "check": {"max_abs_logit_diff": diff, "against": "PyTorch float32 forward, padded batch of 2, decode step"}}
