"""Helpers shared by test modules (test modules import from here, never from each other).

A tiny random Llama model directory and the sentences and prompts it is built and checked on; uvicorn on
loopback in front of an ASGI app, an engine or a model directory, with the client and metrics read there; the
stdlib-docstring workspace corpus; the tiny model, base training and per-method cases that the fine-tuning
tests share.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
import uvicorn

from lmforge.config.base import updated
from lmforge.config.model import ModelConfig
from lmforge.config.serving import ServingConfig
from lmforge.config.training import (
    AdapterConfig,
    LoggingConfig,
    PhaseConfig,
    PlacementConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.core.workspace import Workspace
from lmforge.model.prompt import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, format_prompt
from lmforge.serving.api.launch import bind_socket, url_for
from lmforge.serving.api.server import create_app
from lmforge.serving.engine import Engine
from lmforge.stages.train import train

# ---------------------------------------------------------------- a tiny served model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "json.dumps serializes an object to a JSON formatted string.",
    "Return the sum of a and b, raising TypeError for other types.",
    "### Instruction:\nWhat does this do?\n\n### Response:\nIt returns a value.",
    "héllo wörld, naïve café ✓",
]
PROMPTS = ["The quick", "json.dumps serializes an object to", "a", format_prompt("What does json.dumps do?")]


def make_tiny_model_dir(path: Path) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer trained here, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        initializer_range=0.2,  # peakier logits than the default: no near-ties for greedy decoding
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path



# ---------------------------------------------------------------- uvicorn on loopback

@contextlib.contextmanager
def serve(app, drain_s: float = 5) -> Iterator[tuple[str, uvicorn.Server]]:
    """Run ``app`` under uvicorn (graceful-shutdown drain ``drain_s``) on a free loopback port in a thread;
    yield its base URL and the server (``server.should_exit = True`` is what SIGTERM does)."""
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_s))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield url_for(sock), server
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def running(engine: Engine, cfg: ServingConfig, api_key=None,
            drain_s: float = 5) -> contextlib.AbstractContextManager[tuple[str, uvicorn.Server]]:
    """Serve ``engine`` (as model "tiny", with keys) on loopback (:func:`serve`)."""
    return serve(create_app(engine, "tiny", cfg, api_key=api_key), drain_s)


@contextlib.contextmanager
def served(model_dir: Path, cfg: ServingConfig, api_key=None, drain_s: float = 5,
           **load) -> Iterator[tuple[str, Engine, uvicorn.Server]]:
    """``Engine.load(model_dir, device="cpu", cfg=cfg, **load)`` served on loopback (:func:`running`); yields
    URL, engine and server, and closes the engine after the server stopped."""
    engine = Engine.load(model_dir, device="cpu", cfg=cfg, **load)
    try:
        with running(engine, cfg, api_key, drain_s) as (url, server):
            yield url, engine, server
    finally:
        engine.close()


def openai_client(url: str, **options):
    """The official ``openai`` client on a loopback server's ``/v1`` (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0, **options)


def metric(text: str, name: str) -> float:
    """The value of the unlabelled Prometheus sample ``name`` in a ``/metrics`` page."""
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])

# ---------------------------------------------------------------- a workspace corpus

MODULES = ["json", "textwrap", "string", "functools", "itertools", "shutil", "collections", "os.path", "re"]


def write_corpus(ws: Workspace) -> tuple[int, int]:
    """Curated train/validation Parquet and SFT JSONL from stdlib docstrings (pipeline formats)."""
    docs, sft = [], []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
            if not doc or len(doc) < 40 or doc[:600] in docs:
                continue
            docs.append(doc[:600])
            summary = doc.split("\n\n")[0].replace("\n", " ")[:200]
            sft.append({"id": f"{module_name}.{name}", "instruction": f"What does `{module_name}.{name}` do?",
                        "response": summary})
    rows = [{"id": hashlib.sha256(t.encode()).hexdigest(), "text": t, "source": "stdlib"} for t in docs]
    ws.curated_dir.mkdir(parents=True, exist_ok=True)
    ws.sft_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows[10:]).to_parquet(ws.curated_dir / "train.parquet", index=False)
    pd.DataFrame(rows[:10]).to_parquet(ws.curated_dir / "validation.parquet", index=False)
    (ws.sft_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return len(docs), len(sft)

# ---------------------------------------------------------------- fine-tuning methods

METHODS_MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64, max_seq_len=64)
BASE_TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=30, learning_rate=1e-2, batch_size=8, seq_len=32, warmup_steps=3),
    finetune=PhaseConfig(steps=20, learning_rate=1e-2, batch_size=8, seq_len=64, warmup_steps=2),
    method="pretrain", placement=PlacementConfig(use_ray=False), logging=LoggingConfig(every=4), cpu_threads=1,
    validation=TrainValidationConfig(batches=2),
)
# Learning rates that move each method's few parameters visibly in 20 steps.
CASES = {
    "full": {"method": "full", "lr": 3e-3},
    "lora": {"method": "lora", "lr": 1e-2},
    "adapter": {"method": "adapter", "lr": 1e-2},
    "llama_adapter": {"method": "adapter", "adapter": AdapterConfig(variant="llama_adapter", adapter_layers=2),
                      "lr": 1e-1},
    "prefix": {"method": "prefix", "lr": 1e-2},
    "ptuning_v2": {"method": "ptuning_v2", "lr": 1e-1},
    "prompt": {"method": "prompt", "lr": 3e-1},
    "ptuning": {"method": "ptuning", "lr": 3e-3},
    "ia3": {"method": "ia3", "lr": 2e-1},
}


def finetune(ws, base_cfg, case: str, **extra):
    """Fine-tune ``base_cfg`` in ``ws`` with method case ``case`` of CASES (``extra`` overrides training groups)."""
    spec = dict(CASES[case])
    lr = spec.pop("lr", None)
    # A phase passed in keeps its own learning rate; otherwise the method's tuned rate applies.
    phase = extra.pop("finetune", None) or BASE_TRAINING.finetune.model_copy(
        update={"learning_rate": lr} if lr else {})
    # Groups given as mappings merge into BASE_TRAINING's (speed={"gradient_checkpointing": True}).
    training = updated(BASE_TRAINING, **{**spec, **extra, "pretrain": {"steps": 0}, "finetune": phase})
    return train(training, base_cfg, ws, run_name=case)

# ---------------------------------------------------------------- preference pairs


def write_preferences(ws: Workspace, pairs: int, answer_chars: int = 60) -> list[dict]:
    """``pairs`` canonical preference records from the workspace's SFT pairs (write_corpus) in
    ``ws.preferences_dir/train.jsonl``: chosen is the record's own answer, rejected another's."""
    sft = [json.loads(line) for line in (ws.sft_dir / "train.jsonl").read_text().splitlines()]
    records = [{"id": record["id"], "prompt": [{"role": "user", "content": record["instruction"]}],
                "chosen": [{"role": "assistant", "content": record["response"][:answer_chars]}],
                "rejected": [{"role": "assistant", "content": sft[(i + 7) % len(sft)]["response"][:answer_chars]}]}
               for i, record in enumerate(sft[:pairs])]
    ws.preferences_dir.mkdir(parents=True, exist_ok=True)
    (ws.preferences_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records
