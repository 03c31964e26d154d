"""Several unmerged LoRA adapters over one base, chosen by the request's ``model`` (adapters/lora_slots.py).

Two LoRA adapters are trained here for a few steps on a tiny random Llama (different data, seeds,
ranks and target modules; one saved as a plain peft directory, one as an lmforge run's
``adapter/``). Served together beside the base, each must decode exactly the greedy tokens of the
same adapter merged into the base and served alone, also when requests for the base and both
adapters share one batch, and through the HTTP server with the official ``openai`` client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import openai
import pytest
import torch
from conftest import BIN, REPO, free_port, wait_http
from helpers import PROMPTS, SENTENCES, make_tiny_model_dir
from transformers import AutoTokenizer

from lmforge.config.base import updated
from lmforge.config.serving import KVCacheConfig, SchedulerConfig, ServingConfig
from lmforge.core.errors import ConfigError, ServingError
from lmforge.serving.api import parse_adapters
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine, RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
# Chunked prefill in 16-token chunks and 4-token blocks: mixed batches span prefill and decode steps.
CFG = ServingConfig(scheduler=SchedulerConfig(max_batch_size=8, max_prefill_tokens=16),
                    kv_cache=KVCacheConfig(block_size=4), max_new_tokens=24)


def train_lora(base_dir: Path, out: Path, seed: int, text: str, **lora) -> Path:
    """A few real optimizer steps of a peft LoRA adapter on ``text``; saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora))
    ids = torch.tensor([tokenizer.encode(text)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def merged_engine(base_dir: Path, adapter_dir: Path) -> Engine:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    return Engine(model.eval(), AutoTokenizer.from_pretrained(base_dir), CFG)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi-lora")
    base = make_tiny_model_dir(root / "base")
    # "a": plain peft directory, rank 4 on q/v. "b": an lmforge run's adapter/, rank 8 on every projection, rsLoRA.
    a = train_lora(base, root / "lora-a", 1, SENTENCES[0], r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    train_lora(base, root / "run-b" / "adapter", 2, SENTENCES[1], r=8, lora_alpha=16, use_rslora=True,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return {"base": base, "a": a, "b": root / "run-b"}


@pytest.fixture(scope="module")
def expected(dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    """Greedy tokens per prompt of the base alone and of each adapter merged and served alone."""
    engines = {"base": Engine.load(dirs["base"], device="cpu", cfg=CFG), "a": merged_engine(dirs["base"], dirs["a"]),
               "b": merged_engine(dirs["base"], dirs["b"] / "adapter")}
    try:
        return {name: [list(c.token_ids) for c in engine.generate(PROMPTS, GREEDY)] for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()


@pytest.fixture(scope="module")
def multi(dirs: dict[str, Path]):
    cfg = CFG.model_copy(update={"adapters": {"a": str(dirs["a"]), "b": str(dirs["b"])}})
    engine = Engine.load(dirs["base"], device="cpu", cfg=cfg)
    yield engine
    engine.close()


def test_each_adapter_in_one_mixed_batch_decodes_like_it_merged(multi: Engine, expected) -> None:
    assert multi.backend.name == "paged" and multi.adapters == {"a": 1, "b": 2}
    # The adapters really change the model: otherwise matching the merged ones would prove nothing.
    assert expected["a"] != expected["base"] and expected["b"] != expected["base"] and expected["a"] != expected["b"]
    names = [None, "a", "b"]
    prompts = [p for p in PROMPTS for _ in names]  # 12 requests, 8 rows: rows are reused by other adapters
    results = multi.generate(prompts, GREEDY, adapters=names * len(PROMPTS))
    for i, result in enumerate(results):
        name = names[i % 3] or "base"
        assert list(result.token_ids) == expected[name][i // 3], (name, PROMPTS[i // 3])
    assert multi.stats["peak_batch"] > 3  # base and adapter requests really ran together
    for name in names:  # and alone
        served = multi.generate(PROMPTS[:2], GREEDY, adapters=[name, name])
        assert [list(c.token_ids) for c in served] == expected[name or "base"][:2]


def test_lmforge_serve_with_adapter_flags_routes_by_model(dirs: dict[str, Path], expected, tmp_path: Path) -> None:
    """The README's command: `lmforge serve BASE --adapter NAME=DIR ...`, then the openai client."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "lmforge"), "serve", str(dirs["base"]), "--port", str(port),
                             "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}"],
                            env=dict(os.environ, LMFORGE_HOME=str(tmp_path / "home")), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
        tokenizer = AutoTokenizer.from_pretrained(dirs["base"])
        for name in ("base", "a", "b"):
            out = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0)
            ids = expected[name][1]
            ids = ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids
            assert out.model == name and out.choices[0].text == tokenizer.decode(ids)
        with pytest.raises(openai.NotFoundError, match="'base', 'a', 'b'"):
            client.completions.create(model="c", prompt=PROMPTS[1], max_tokens=4)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_unknown_or_clashing_adapter_names_are_refused(multi: Engine) -> None:
    with pytest.raises(RequestError, match="no adapter named 'c'"):
        multi.generate(PROMPTS[:1], GREEDY, adapters=["c"])
    with pytest.raises(ServingError, match="also the base model's served name"):
        create_app(multi, "a", CFG)


def test_adapters_that_cannot_be_served_unmerged_are_refused(dirs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    def load(adapters: dict[str, Path], **cfg) -> None:
        config = updated(CFG, adapters={k: str(v) for k, v in adapters.items()}, **cfg)
        Engine.load(dirs["base"], device="cpu", cfg=config).close()

    wrong = tmp_path / "wrong-shape"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((dirs["a"] / "adapter_config.json").read_text())
    tensors = load_file(str(dirs["a"] / "adapter_model.safetensors"))
    save_file({k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in tensors.items()},
              str(wrong / "adapter_model.safetensors"))
    with pytest.raises(ServingError, match="does not fit the served base: layer 0 q_proj maps 48"):
        load({"w": wrong})
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ServingError, match=r"(?s)is a IA3 adapter.*serve it merged"):
        load({"i": ia3})
    with pytest.raises(ServingError, match="no adapter"):
        load({"x": tmp_path})
    with pytest.raises(ServingError, match="needs the paged engine"):
        load({"a": dirs["a"]}, runtime={"engine": "hf"})


def test_adapter_flags_parse_into_the_serving_config() -> None:
    cfg = parse_adapters(["a=/tmp/x", "b=rel/y"], ServingConfig(adapters={"c": "/z"}))
    assert cfg.adapters == {"c": "/z", "a": "/tmp/x", "b": str(Path("rel/y").resolve())}
    for bad, why in ((["a=/x", "a=/y"], "twice"), (["a"], "NAME=DIR"), (["=x"], "NAME=DIR"), (["c=/q"], "twice")):
        with pytest.raises(ConfigError, match=why):
            parse_adapters(bad, ServingConfig(adapters={"c": "/z"}))
    with pytest.raises(ValueError, match="names must be non-empty"):
        ServingConfig(adapters={" a": "/x"})
