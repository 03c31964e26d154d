"""The paged engine on CPU: KV cache admission, chunked prefill, echo logprobs, backends, int8.

Greedy tokens are checked against ``transformers`` ``generate()`` on a tiny random Llama; the HF
fallback backend against the paged one; GPT-2 (not a Llama) must still be served by the fallback.
The Triton kernels are checked against the PyTorch ops in the CPU interpreter when Triton is
installed (it is not a CPU dependency; the GPU benchmark checks them on the device).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.engine import Engine, RequestError, SamplingParams
from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache
from lmforge.serving.quant.quantize import Int8Linear

GREEDY = SamplingParams(max_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-paged"))


def _engine(model_dir: Path, **cfg) -> Engine:
    return Engine.load(model_dir, device="cpu", cfg=ServingConfig(**cfg))


def _reference(engine: Engine, prompt: str | list[int], n: int) -> list[int]:
    ids = torch.tensor([engine.encode(prompt) if isinstance(prompt, str) else prompt])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, ids.shape[1]:].tolist()


def test_chunked_prefill_and_small_blocks_match_generate(model_dir: Path) -> None:
    engine = _engine(model_dir, scheduler={"max_prefill_tokens": 16, "max_batch_size": 3}, kv_cache={"block_size": 4})
    try:
        assert engine.backend.name == "paged"
        long_prompt = PROMPTS[3] + " " + PROMPTS[1]  # several 16-token chunks
        prompts = [long_prompt, PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # 4 requests, 3 rows: one waits
        results = engine.generate(prompts, GREEDY)
        for prompt, result in zip(prompts, results):
            expected = _reference(engine, prompt, 20)
            assert list(result.token_ids) == expected[: len(result.token_ids)]
        assert engine.stats["prefills"] > 2 and engine.stats["peak_batch"] <= 3
        assert engine.cache_usage == 0.0  # every finished request gave its blocks back
    finally:
        engine.close()


def test_hf_backend_matches_paged(model_dir: Path) -> None:
    paged, hf = _engine(model_dir), _engine(model_dir, runtime={"engine": "hf"})
    try:
        assert hf.backend.name == "hf"
        assert ([r.token_ids for r in hf.generate(PROMPTS, GREEDY)]
                == [r.token_ids for r in paged.generate(PROMPTS, GREEDY)])
    finally:
        paged.close()
        hf.close()


def test_admission_waits_for_cache_and_refuses_what_never_fits(model_dir: Path) -> None:
    shape = CacheShape(2, 2, 8, 16, torch.float32)
    # Room for exactly 3 blocks of 16 tokens: one request of ~40 tokens at a time.
    budget = (4 * shape.bytes_per_block()) / 2**20
    engine = _engine(model_dir, kv_cache={"memory_mb": budget}, scheduler={"max_batch_size": 4})
    try:
        params = SamplingParams(max_tokens=30, temperature=0)
        results = engine.generate(["The quick", "a"], params)
        assert all(r.completion_tokens > 0 for r in results)
        assert engine.stats["peak_batch"] == 1  # the second waited for the first's blocks
        with pytest.raises(RequestError) as err:
            engine.generate(["The quick"], SamplingParams(max_tokens=60))
        assert err.value.code == "kv_cache_too_small" and "kv_cache.memory_mb" in err.value.fix
    finally:
        engine.close()


def test_kv_cache_blocks_are_reserved_and_returned() -> None:
    cache = PagedKVCache(CacheShape(1, 1, 4, 4, torch.float32), num_blocks=6, max_rows=2, max_len=32,
                         device=torch.device("cpu"))
    assert cache.usable_blocks == 5 and cache.fits_ever(20) and not cache.fits_ever(21)
    row = cache.reserve(9)  # 3 blocks
    assert not cache.can_reserve(9) and cache.can_reserve(8)
    slots = cache.slots(row, 0, 9)
    assert len(set(s // 4 for s in slots)) == 3 and all(s >= 4 for s in slots)  # never the scratch block
    assert cache.table[cache.scratch_row].abs().sum() == 0
    cache.release(row)
    assert cache.usage == 0.0 and cache.can_reserve(20)


def test_echo_prompt_logprobs_match_the_model(model_dir: Path) -> None:
    engine = _engine(model_dir, scheduler={"max_prefill_tokens": 16})  # the prompt spans chunks
    try:
        ids = engine.encode(PROMPTS[3])
        result = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
        assert result.completion_tokens == 0 and result.finish_reason == "length"
        entries = result.prompt_logprobs
        assert len(entries) == len(ids) and entries[0].logprob is None
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), -1)
        expected = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
        assert [e.logprob for e in entries[1:]] == pytest.approx(expected, abs=1e-4)
        assert all(len(e.top) == 2 and e.top[0][1] >= e.logprob - 1e-6 for e in entries[1:])
    finally:
        engine.close()


def test_gpt2_is_served_by_the_fallback(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = make_tiny_model_dir(tmp_path / "llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       eos_token_id=tokenizer.eos_token_id)).eval()
    engine = Engine(model, tokenizer, ServingConfig())
    try:
        assert engine.backend.name == "hf"
        ids = engine.encode(PROMPTS[0])
        assert list(engine.generate([ids], GREEDY)[0].token_ids) == _reference(engine, ids, 20)[:20]
    finally:
        engine.close()


def test_int8_weights_serve_close_to_full_precision(model_dir: Path) -> None:
    full, int8 = _engine(model_dir), _engine(model_dir, runtime={"quantization": "int8"})
    try:
        layer = int8.model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, Int8Linear) and layer.self_attn.q_proj.qweight.dtype == torch.int8
        ids = torch.tensor([full.encode(PROMPTS[1])])
        with torch.no_grad():
            a, b = full.model(ids).logits, int8.model(ids).logits
        assert float((a - b).norm() / a.norm()) < 0.05
        assert int8.generate([PROMPTS[1]], GREEDY)[0].completion_tokens > 0
    finally:
        full.close()
        int8.close()


def test_sampling_filters_degenerate_to_greedy(model_dir: Path) -> None:
    engine = _engine(model_dir)
    try:
        greedy = engine.generate([PROMPTS[1]], GREEDY)[0].token_ids
        for params in (SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=1),
                       SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=2)):
            assert engine.generate([PROMPTS[1]], params)[0].token_ids == greedy
    finally:
        engine.close()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs triton and TRITON_INTERPRET=1")
def test_triton_kernels_match_the_model_in_the_interpreter(model_dir: Path) -> None:
    from lmforge.serving.backends.base import PrefillItem
    from lmforge.serving.backends.paged import PagedBackend
    from lmforge.serving.model.ops import TritonOps

    engine = _engine(model_dir)
    engine.close()  # only its model and tokenizer are needed
    backend = PagedBackend(engine.model, engine.cfg, engine.context_window, ops=TritonOps())
    ids = [engine.encode(p) for p in PROMPTS]
    rows = [backend.reserve(len(i) + 1) for i in ids]
    with torch.no_grad():
        prefill = backend.prefill([PrefillItem(r, 0, i, all_logits=True) for r, i in zip(rows, ids)])
        decode = backend.decode(rows, [len(i) for i in ids], [5] * len(ids))
        for logits, step, prompt in zip(prefill, decode, ids):
            ref = engine.model(torch.tensor([[*prompt, 5]])).logits[0]
            assert float((logits - ref[:-1]).norm() / ref[:-1].norm()) < 1e-4
            assert float((step - ref[-1]).norm() / ref[-1].norm()) < 1e-4


def test_unmerged_adapters_are_applied_or_refused(tmp_path: Path) -> None:
    import json

    from lmforge.core.errors import ServingError
    from lmforge.train.artifacts import MARKER
    from lmforge.train.methods import bottleneck as adapters

    model_dir = make_tiny_model_dir(tmp_path / "model")
    base = Engine.load(model_dir, device="cpu")
    base.close()
    ids = base.encode(PROMPTS[1])
    plain = _reference(base, ids, 20)
    model = base.model
    adapters.add_adapters(model, bottleneck=4)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)  # a visible change: fresh adapters start as the identity
    adapters.save_adapter(model, model_dir / "adapter", base_dir=".")
    (model_dir / MARKER).write_text(json.dumps({"adapter": "adapter"}))
    adapted = Engine.load(model_dir, device="cpu")
    try:
        assert adapted.backend.name == "hf"  # wrapped layers: served through the model's own forward
        served = list(adapted.generate([ids], GREEDY)[0].token_ids)
        assert served == _reference(adapted, ids, 20)[: len(served)] and served != plain[: len(served)]
    finally:
        adapted.close()
    (model_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    with pytest.raises(ServingError, match="LOHA"):
        Engine.load(model_dir, device="cpu")
