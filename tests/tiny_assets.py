"""Tiny real assets for tests: a byte-level BPE tokenizer, a random 2-layer Llama, workspace data.

Everything is built from config in a second or two, with no network and no hub, and saved in the
same formats the pipeline writes (safetensors model directory, curated Parquet, SFT JSONL).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmforge.core.workspace import Workspace

CORPUS = [
    "Return the absolute value of a number.",
    "Serialize obj to a JSON formatted str.",
    "Split the pathname path into a pair (head, tail).",
    "Return a new sorted list from the items in iterable.",
    "Open file and return a corresponding file object.",
    "Deserialize s to a Python object.",
    "Return the number of items in a container.",
    "Create a new dictionary with keys from iterable and values set to value.",
]

SFT = [
    {"instruction": "What does `abs` do?", "response": "Return the absolute value of a number."},
    {"instruction": "What does `json.dumps` do?", "response": "Serialize obj to a JSON formatted str."},
    {"instruction": "What does `len` do?", "response": "Return the number of items in a container."},
    {"instruction": "What does `sorted` do?", "response": "Return a new sorted list from the items in iterable."},
    {"instruction": "What does `open` do?", "response": "Open file and return a corresponding file object."},
]


def build_tokenizer(vocab_size: int = 320):
    from lmforge.tokenizer.build import build_bpe

    # min_frequency 0: the tiny corpus is too small for the production threshold of 2.
    return build_bpe(CORPUS * 4 + [json.dumps(r) for r in SFT], vocab_size, min_frequency=0)


def build_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a random Llama (hidden 32, 2 layers) plus tokenizer into ``path`` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_workspace_data(ws: Workspace) -> None:
    """curated/validation.parquet and sft/{train,test}.jsonl in the pipeline's formats."""
    import pandas as pd

    ws.curated_dir.mkdir(parents=True, exist_ok=True)
    ws.sft_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(CORPUS * 3):
        text = f"{text} ({i})"
        rows.append(
            {
                "id": hashlib.sha256(text.encode()).hexdigest(),
                "text": text,
                "source": "test",
                "uri": f"test://{i}",
                "title": f"doc {i}",
                "fetched_at": "2026-01-01T00:00:00Z",
                "content_type": "text/plain",
                "meta": "{}",
            }
        )
    pd.DataFrame(rows).to_parquet(ws.curated_dir / "validation.parquet", index=False)
    lines = [json.dumps({"id": str(i), **r}) for i, r in enumerate(SFT)]
    (ws.sft_dir / "test.jsonl").write_text("\n".join(lines) + "\n")
    (ws.sft_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
