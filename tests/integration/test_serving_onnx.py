"""ONNX export and serving through ONNX Runtime, checked against the PyTorch engine on CPU.

The tiny random Llama of ``test_serving`` is exported once with the real ``lmforge export-onnx``
command (in-process); its logits, the engine's greedy tokens and logprobs, and HTTP requests are
compared with PyTorch. GPT-2 is exported too; LMFORGE_SLOW=1 adds more architectures and the real
`lmforge serve OUT_DIR` process.

    .venv/bin/python -m pytest -q tests/integration/test_serving_onnx.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from conftest import BIN, REPO, free_port, wait_http
from helpers import make_tiny_model_dir, running

from lmforge.cli import main
from lmforge.config.base import updated
from lmforge.config.serving import RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.backends.hf import DecodeBatch
from lmforge.serving.engine import Engine, SamplingParams

pytest.importorskip("onnxruntime", reason="optional extra: pip install -e '.[onnx]' (make install does)")
pytest.importorskip("onnxscript", reason="optional extra: pip install -e '.[onnx]' (make install does)")

# Both sides compute in float32 and differ only in the order of floating-point sums (~1e-6 measured
# on logits of size ~1). 1e-4 leaves room for other CPUs' kernels and is still far below the
# smallest gap between the two best tokens that greedy decoding of these prompts meets (0.016).
LOGIT_ATOL = 1e-4
PROMPTS = ["The quick", "json.dumps serializes an object to", "a", "héllo wörld, naïve café"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(PyTorch model directory, its export written by the CLI)."""
    root = tmp_path_factory.mktemp("onnx")
    model_dir = make_tiny_model_dir(root / "model")
    # The real command, in-process: a subprocess would pay ~7 s more to import torch again.
    out, saved = io.StringIO(), os.environ.copy()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["--home", str(root / "home"), "export-onnx", str(model_dir), str(root / "onnx"), "--json"])
    finally:  # the CLI points LMFORGE_HOME at its workspace and sets defaults: leave other tests' env as it was
        os.environ.clear()
        os.environ.update(saved)
    assert code == 0
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert summary["architecture"] == "LlamaForCausalLM" and summary["layers"] == 2
    return model_dir, root / "onnx"


def test_export_writes_graph_tokenizer_and_io_description(dirs: tuple[Path, Path]) -> None:
    import onnx

    _, onnx_dir = dirs
    for name in ("model.onnx", "config.json", "tokenizer.json", "generation_config.json"):
        assert (onnx_dir / name).is_file(), name
    onnx.checker.check_model(str(onnx_dir / "model.onnx"))
    spec = json.loads((onnx_dir / "onnx_model.json").read_text())
    inputs = {i["name"]: i["shape"] for i in spec["inputs"]}
    outputs = {o["name"]: o["shape"] for o in spec["outputs"]}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["past_key_1"][0] == "batch" and isinstance(inputs["past_key_1"][2], str)  # dynamic past length
    assert outputs["logits"] == ["batch", "sequence", 320] and "present_value_1" in outputs
    assert spec["check"]["max_abs_logit_diff"] < LOGIT_ATOL


def test_logits_match_pytorch_through_prefill_and_decode(dirs: tuple[Path, Path]) -> None:
    """Same left-padded batch through both models' dense caches: prefill, then 4 decode steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.serving.model.onnx_model import load_onnx_model

    model_dir, onnx_dir = dirs
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    exported, _ = load_onnx_model(onnx_dir, "cpu", "none")
    exported.start(threads=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    with torch.inference_mode():
        ours, got = DecodeBatch.prefill(exported, prompts, 0, all_columns=True)
        theirs, want = DecodeBatch.prefill(reference, prompts, 0, all_columns=True)
        mask = ours.mask.bool()  # padded columns' logits are meaningless on both sides
        torch.testing.assert_close(got[mask], want[mask], atol=LOGIT_ATOL, rtol=0)
        tokens = want[:, -1].argmax(-1)
        for _ in range(4):
            got, want = ours.decode(exported, tokens), theirs.decode(reference, tokens)
            torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
            tokens = want.argmax(-1)
    assert ours.cache.layers[0].keys.shape == theirs.cache.layers[0].keys.shape


def test_engine_greedy_tokens_equal_the_pytorch_engine(dirs: tuple[Path, Path]) -> None:
    model_dir, onnx_dir = dirs
    """Greedy tokens exactly; their logprobs and the prompts' (echo) within the logit tolerance."""
    cfg = ServingConfig(runtime=RuntimeConfig(device="cpu", onnx_threads=1),
                        scheduler=SchedulerConfig(max_batch_size=2))  # 4 requests: rows join and leave
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=2, prompt_logprobs=1)
    tokens, logprobs = {}, {}
    for name, path in (("onnx", onnx_dir), ("torch", model_dir)):
        engine = Engine.load(path, cfg=cfg)
        try:
            done = engine.generate(PROMPTS, params)
            assert (engine.backend.name == "onnx") == (name == "onnx")
        finally:
            engine.close()
        tokens[name] = [c.token_ids for c in done]
        logprobs[name] = torch.tensor([lp.logprob for c in done for lp in (*c.prompt_logprobs[1:], *c.logprobs)])
    assert tokens["onnx"] == tokens["torch"]
    assert sum(len(ids) for ids in tokens["onnx"]) > 2 * len(PROMPTS)  # real decoding, not instant EOS
    torch.testing.assert_close(logprobs["onnx"], logprobs["torch"], atol=2 * LOGIT_ATOL, rtol=0)


def test_http_completion_and_chat_from_the_onnx_engine(dirs: tuple[Path, Path]) -> None:
    _, onnx_dir = dirs
    cfg = ServingConfig(runtime=RuntimeConfig(device="cpu"), scheduler=SchedulerConfig(max_batch_size=2),
                        max_new_tokens=8)
    engine = Engine.load(onnx_dir, cfg=cfg)
    try:
        expected = engine.generate(["The quick"], SamplingParams(max_tokens=8, temperature=0))[0]
        with running(engine, cfg) as (url, _server):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "The quick", "max_tokens": 8, "temperature": 0})
            chat = httpx.post(f"{url}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    finally:
        engine.close()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected.text
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_lmforge_serve_onnx_dir_with_the_openai_client(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """The README's second command, `lmforge serve OUT_DIR`, as a real process."""
    import openai

    _, onnx_dir = dirs
    port = free_port()
    proc = subprocess.Popen([str(BIN / "lmforge"), "serve", str(onnx_dir), "--port", str(port)],
                            env=dict(os.environ, LMFORGE_HOME=str(tmp_path / "home")), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        out = client.completions.create(model="onnx", prompt="The quick", max_tokens=6, temperature=0, logprobs=2)
        chunks = list(client.chat.completions.create(model="onnx", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, stream=True))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    assert out.usage.completion_tokens >= 1 and len(out.choices[0].logprobs.top_logprobs[0]) == 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_engine_choice_errors_name_the_fix(dirs: tuple[Path, Path]) -> None:
    model_dir, onnx_dir = dirs
    with pytest.raises(ServingError) as err:
        Engine.load(onnx_dir, cfg=ServingConfig(runtime=RuntimeConfig(device="cpu", engine="paged")))
    assert "ONNX export" in err.value.cause and "'onnx'" in err.value.fix
    with pytest.raises(ServingError) as err:
        Engine.load(model_dir, cfg=ServingConfig(runtime=RuntimeConfig(device="cpu", engine="onnx")))
    assert "export-onnx" in err.value.fix
    with pytest.raises(ServingError) as err:
        Engine.load(onnx_dir, cfg=ServingConfig(runtime=RuntimeConfig(device="cpu", quantization="int8")))
    assert "quantization" in err.value.cause


def test_export_refuses_to_shadow_weights_or_export_an_export(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    from lmforge.serving.export import export_onnx

    model_dir, onnx_dir = dirs
    with pytest.raises(ServingError) as err:
        export_onnx(model_dir, model_dir)
    assert "PyTorch weights" in err.value.cause and not (model_dir / "model.onnx").exists()
    with pytest.raises(ServingError) as err:
        export_onnx(onnx_dir, tmp_path / "again")
    assert "already an ONNX export" in err.value.cause


@pytest.mark.parametrize("arch", ["gpt2", *(pytest.param(a, marks=pytest.mark.slow)
                                            for a in ("qwen2", "gpt_neox", "opt"))])
def test_other_architectures_export_and_decode_like_pytorch(arch: str, dirs, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmforge.serving.export import export_onnx

    model_dir, _ = dirs
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                 vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    shape |= {"gpt2": {}, "qwen2": dict(intermediate_size=64, num_key_value_heads=2),
              "gpt_neox": dict(intermediate_size=64), "opt": dict(ffn_dim=64, word_embed_proj_dim=32)}[arch]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **shape)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert export_onnx(tmp_path / "model", tmp_path / "onnx").max_abs_logit_diff < LOGIT_ATOL
    cfg = ServingConfig(runtime=RuntimeConfig(device="cpu", engine="hf"),
                        scheduler=SchedulerConfig(max_batch_size=2))
    params = SamplingParams(max_tokens=12, temperature=0)
    outputs = []
    for path, engine_kind in ((tmp_path / "onnx", "auto"), (tmp_path / "model", "hf")):
        engine = Engine.load(path, cfg=updated(cfg, runtime={"engine": engine_kind}))
        try:
            outputs.append([c.token_ids for c in engine.generate(PROMPTS, params)])
        finally:
            engine.close()
    assert outputs[0] == outputs[1]


def test_sliding_window_models_are_refused_with_a_fix(tmp_path: Path, dirs) -> None:
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from lmforge.serving.export import export_onnx

    tokenizer = AutoTokenizer.from_pretrained(dirs[0])
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=64)
    MistralForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(ServingError) as err:
        export_onnx(tmp_path / "model", tmp_path / "onnx")
    assert "sliding" in err.value.fix and not (tmp_path / "onnx" / "model.onnx").exists()
