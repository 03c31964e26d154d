"""Load a model exported by ``lmforge export-onnx`` as a causal LM that ONNX Runtime runs on CPU.

    lmforge serve OUT_DIR          (a directory written by `lmforge export-onnx MODEL OUT_DIR`)

:class:`OnnxCausalLM` is an ONNX Runtime session dressed as the part of a transformers causal LM
the engine uses (``config``, ``device``, ``generation_config``, the vocabulary size, and a forward
that takes and grows a ``DynamicCache``). The engine's dense-cache backend (``backends/hf.py``:
left padding, per-row positions, merge and keep at step boundaries) then runs it unchanged
(``backends/onnx.py``), so ONNX Runtime serves with the same continuous batching, sampling and
server as the PyTorch engines. The session uses the CPUExecutionProvider; ``serving.runtime.onnx_threads``
sets its intra-op threads.

The export's format (``SPEC_FILE``, ``SPEC_FORMAT``, :func:`io_names`) is defined here, where it is
read; the exporter (``export/onnx.py``) writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from lmforge.core.errors import ServingError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase

SPEC_FILE = "onnx_model.json"
SPEC_FORMAT = "lmforge-onnx-causal-lm/1"
INSTALL_FIX = "install the optional ONNX dependencies: pip install 'lmforge[onnx]' (make install does)"


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph, in order."""
    kv = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_{n}" for n in kv],
            ["logits"] + [f"present_{n}" for n in kv])


def new_session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session for ``path``; ``threads`` intra-op threads (None: one per core)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ServingError(f"serving an ONNX model needs onnxruntime ({exc})", INSTALL_FIX) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1  # one decoder graph: no independent branches worth a second pool
    # Idle pool threads would spin between steps, taking cores from the engine thread and the server.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Vocabulary:
    def __init__(self, size: int) -> None:
        self.num_embeddings = size


class OnnxCausalLM:
    """An exported decoder step behind the causal-LM interface ``backends/hf.py``'s ``DecodeBatch`` calls.

    The session starts in :meth:`start` (from the serving config), not at load.
    """

    device = torch.device("cpu")

    def __init__(self, model_dir: Path, config: PreTrainedConfig, generation_config: GenerationConfig,
                 spec: dict[str, Any]) -> None:
        self.model_dir = model_dir
        self.config = config
        self.generation_config = generation_config
        self.spec = spec
        self.layers = int(spec["layers"])
        self.input_names, self.output_names = io_names(self.layers)
        self.session: Any = None

    def start(self, threads: int | None) -> None:
        self.session = new_session(self.model_dir / "model.onnx", threads)

    def get_input_embeddings(self) -> _Vocabulary:
        return _Vocabulary(int(self.spec["vocab_size"]))

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        return self.forward(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                use_cache: bool = True, logits_to_keep: int = 0, past_key_values: Any = None) -> SimpleNamespace:
        """One step; the new keys and values replace the cache's (the graph returns past plus new)."""
        rows = input_ids.shape[0]
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                "position_ids": position_ids.numpy()}
        for i, layer in enumerate(past_key_values.layers):
            feed[f"past_key_{i}"] = self._past(layer, "keys", rows, i)
            feed[f"past_value_{i}"] = self._past(layer, "values", rows, i)
        logits, *present = self.session.run(self.output_names, feed)
        for i, layer in enumerate(past_key_values.layers):
            keys, values = torch.from_numpy(present[2 * i]), torch.from_numpy(present[2 * i + 1])
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        logits = torch.from_numpy(logits)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    def _past(self, layer: Any, kind: str, rows: int, index: int) -> Any:
        if layer.is_initialized:
            return getattr(layer, kind).contiguous().numpy()
        shape = self._cache_shapes[index][kind]
        return torch.zeros(rows, shape[1], 0, shape[3]).numpy()

    @property
    def _cache_shapes(self) -> list[dict[str, list]]:
        """Per layer, the declared shape of the past keys and values (heads and head size are fixed)."""
        shapes = {i["name"]: i["shape"] for i in self.spec["inputs"]}
        return [{"keys": shapes[f"past_key_{i}"], "values": shapes[f"past_value_{i}"]} for i in range(self.layers)]


def load_onnx_model(model_dir: Path, device: str | None,
                    quantization: str) -> tuple[OnnxCausalLM, PreTrainedTokenizerBase]:
    """The ONNX model (session not started) and tokenizer of an ``export-onnx`` directory."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    if device not in (None, "cpu"):
        raise ServingError(f"{model_dir} is an ONNX export, served by ONNX Runtime on CPU only (device {device!r})",
                           "set serving.runtime.device to 'cpu' (or leave it unset), or serve the PyTorch model on "
                           "the GPU")
    if quantization != "none":
        raise ServingError(f"serving.runtime.quantization {quantization!r} applies to PyTorch weights, not to an "
                           "ONNX export",
                           "set serving.runtime.quantization to 'none', or serve the PyTorch model directory quantized")
    spec_path = model_dir / SPEC_FILE
    spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
    if spec.get("format") != SPEC_FORMAT:
        raise ServingError(f"{model_dir} has model.onnx but no {SPEC_FILE} of format {SPEC_FORMAT}",
                           "export it with `lmforge export-onnx MODEL OUT_DIR` and serve OUT_DIR")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    return OnnxCausalLM(model_dir, config, generation, spec), tokenizer
