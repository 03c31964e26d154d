"""An fp8 KV cache with a prompt-learning prefix is refused at load, with the fix named (issue 19).

Measured on an H100 (``python -m bench.serve.gpu_check``): with fp8 storage a prefix adapter's keys
(about 4x larger than ordinary ones) moved the logits 11-32% against a bf16 cache, so the paged
backend refuses the combination instead of serving it degraded. The fp8 cache runs on the CPU, so the
refusal is checked here, in the engine and through ``lmforge serve``'s error/fix output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir

from lmforge.cli import main
from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.serving.adapters.virtual_tokens import VirtualPrefix
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.model.loading import load_model

FIX = "serving.kv_cache.dtype: bf16"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-fp8-prefix"))


def _with_prefix(model_dir: Path, virtual: int = 6):
    model, tokenizer = load_model(model_dir, "cpu")
    generator = torch.Generator().manual_seed(virtual)
    keys, values = (torch.randn(2, virtual, 2, 8, generator=generator) for _ in range(2))  # 2 layers, 2 KV heads
    model.lmforge_virtual_prefix = VirtualPrefix("PREFIX_TUNING", keys, values)
    return model, tokenizer


def test_fp8_cache_with_a_prefix_is_refused_naming_the_fix(model_dir: Path) -> None:
    model, tokenizer = _with_prefix(model_dir)
    with pytest.raises(ServingError, match="6-token prompt-learning prefix") as refused:
        Engine(model, tokenizer, ServingConfig(kv_cache={"dtype": "fp8"}))
    assert FIX in refused.value.fix
    # The fix works: the same model with its own dtype in the cache serves.
    engine = Engine(model, tokenizer, ServingConfig(kv_cache={"dtype": "bf16"}))
    try:
        assert engine.backend.virtual_tokens == 6
        done = engine.generate(["hello"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
        assert done.completion_tokens == 3
    finally:
        engine.close()


def test_fp8_cache_without_a_prefix_still_loads(model_dir: Path) -> None:
    engine = Engine.load(model_dir, device="cpu", cfg=ServingConfig(kv_cache={"dtype": "fp8"}))
    try:
        assert engine.backend.cache.keys.dtype == torch.float8_e4m3fn
    finally:
        engine.close()


def test_lmforge_serve_prints_the_refusal_without_a_traceback(model_dir: Path, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.artifacts import save_unmerged

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = peft.get_peft_model(base, peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    save_unmerged(tuned, AutoTokenizer.from_pretrained(model_dir), tmp_path / "run", tmp_path / "run", model_dir)
    config = tmp_path / "fp8.yaml"
    config.write_text("serving:\n  kv_cache:\n    dtype: fp8\n  runtime:\n    device: cpu\n")
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    code = main(["serve", str(tmp_path / "run" / "model"), "--config", str(config), "--port", "0"])
    err = capsys.readouterr().err
    assert code == ServingError.exit_code
    assert "error: an fp8 KV cache (serving.kv_cache.dtype: fp8) cannot hold this model's 4-token" in err
    assert f"fix: set {FIX} (or auto) for this model" in err and "Traceback" not in err
