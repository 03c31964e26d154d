"""Tiny models, adapters and reference models for ``bench.serve.gpu_check`` (see its docstring).

A small Llama pretrained briefly on Python's own json package source, LoRA and prompt-learning
adapters trained a few steps on parts of it, and the references the engine is compared with: peft's
model (``load_trained``) and the merged model, decoding greedily or scoring the engine's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# Tokens generated per request (Scale.new): 32 steps of every request enter each comparison, so the
# largest-distance statistics of the engine and of the bf16 reference are taken over the same many steps.
NEW = 32
VIRTUAL = 20  # with 16-token blocks: one block shared by every sequence, 4 tokens copied into each

METHODS = ("prefix", "ptuning_v2", "prompt", "ptuning")  # the prompt-learning adapters checked
PROMPTS = [
    "def encode(self, o):",
    "class JSONEncoder(object):",
    "x",
    "    Return a JSON string representation of a Python data structure. If skipkeys is true then dict "
    "keys that are not basic types will be skipped instead of raising a TypeError, and the items",
    "import re",
]

# The base and LoRA adapters a and b mixed in one batch: 15 requests on 8 rows.
MIXED: list[tuple[int, str | None]] = [(p, name) for p in range(len(PROMPTS)) for name in (None, "a", "b")]


@dataclass(frozen=True)
class Scale:
    """The base model's shape and how long the base and each adapter train."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    pretrain_steps: int
    adapter_steps: int
    new: int = NEW


FULL = Scale(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, pretrain_steps=120, adapter_steps=40)
TINY = Scale(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, pretrain_steps=15, adapter_steps=5,
             new=8)  # --tiny: a check of the script, not of the engine's numerics


def corpus() -> tuple[str, list[str]]:
    """Python's own json package source: a tokenizer corpus present on every machine. The pretraining
    text and the adapters' texts are parts of it."""
    import json as json_pkg

    files = sorted(Path(json_pkg.__file__).parent.glob("*.py"))
    text = "\n".join(f.read_text() for f in files)
    parts = [text[i : i + 3000] for i in range(0, 5 * 3000, 3000)]
    return text, parts


def fit(model: torch.nn.Module, ids: list[int], steps: int, lr: float, seed: int) -> float:
    """A few AdamW steps of next-token loss on random 64-token windows of ``ids``."""
    device = next(model.parameters()).device
    data = torch.tensor(ids, device=device)
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=rng).tolist()
        batch = torch.stack([data[s : s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_base(root: Path, device: str, scale: Scale = FULL) -> tuple[Path, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.tokenizer.build import build_bpe

    text, parts = corpus()
    tokenizer = build_bpe([text], vocab_size=1000)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=scale.hidden, intermediate_size=scale.intermediate,
                         num_hidden_layers=scale.layers, num_attention_heads=scale.heads,
                         num_key_value_heads=scale.kv_heads, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    loss = fit(model, tokenizer.encode(parts[0] + parts[1]), steps=scale.pretrain_steps, lr=3e-3, seed=0)
    path = root / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, {"vocab": len(tokenizer), "pretrain_loss": round(loss, 3)}


def train_lora(base: Path, out: Path, device: str, text: str, seed: int, lr: float, steps: int = 40, **lora) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    loss = fit(model, tokenizer.encode(text), steps=steps, lr=lr, seed=seed)
    model.save_pretrained(out)
    return loss


def train_prompt(base: Path, out: Path, device: str, method: str, text: str, seed: int, steps: int = 40) -> Path:
    """The production save path (``save_unmerged``): model/ = base + adapter/ + marker."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.artifacts import save_unmerged

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    common = {"num_virtual_tokens": VIRTUAL, "task_type": "CAUSAL_LM"}
    config = {
        "prefix": lambda: peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=128, **common),
        "ptuning_v2": lambda: peft.PrefixTuningConfig(prefix_projection=False, **common),
        "prompt": lambda: peft.PromptTuningConfig(**common),
        "ptuning": lambda: peft.PromptEncoderConfig(encoder_hidden_size=128, **common),
    }[method]()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model = peft.get_peft_model(model, config)
    fit(model, tokenizer.encode(text), steps=steps, lr=3e-2, seed=seed)
    save_unmerged(model, tokenizer, out, out, base)
    return out / "model"


@dataclass
class Out:
    tokens: list[int]
    logits: list[torch.Tensor]  # one float32 row per generated token: the logits it was chosen from
    cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache
    finish_reason: str = "length"
    text: str = ""


def serving_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32  # as loading.load_model picks


def peft_model(model_dir: Path, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """peft's own model (``load_trained``) entirely in ``dtype`` (default: the serving dtype)."""
    from lmforge.train.artifacts import load_trained

    dtype = dtype or serving_dtype(device)
    return load_trained(model_dir, dtype=dtype, device=device).to(dtype)


def merged_model(base: Path, adapter: Path | None, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The base, or the adapter merged into it in float32, then cast to ``dtype`` (default: the serving dtype)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(device=device, dtype=dtype or serving_dtype(device)).eval()


@torch.no_grad()
def model_greedy(model: torch.nn.Module, prompts: list[list[int]], new: int = NEW) -> list[Out]:
    """Greedy by the model's full forward at every step (as ``artifacts.greedy_ids`` decodes
    prompt-learning models: peft's generate() drops prefixes under transformers 5)."""
    device = next(model.parameters()).device
    outs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        tokens, logits = [], []
        for _ in range(new):
            row = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            tokens.append(int(row.argmax()))
            logits.append(row.float().cpu())
            ids = torch.cat([ids, ids.new_tensor([[tokens[-1]]])], dim=1)
        outs.append(Out(tokens, logits))
    return outs


@torch.no_grad()
def model_forced(model: torch.nn.Module, prompts: list[list[int]], served: list[Out]) -> list[Out]:
    """The model's logits at every step of the engine's own completions (teacher forcing), and its
    argmax there as its tokens."""
    device = next(model.parameters()).device
    outs = []
    for prompt, out in zip(prompts, served, strict=True):
        ids = torch.tensor([prompt + out.tokens[:-1]], device=device)
        # The last NEW rows: prompt tuning's output starts with rows for its virtual tokens.
        rows = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(out.tokens):].float().cpu()
        outs.append(Out(rows.argmax(-1).tolist(), list(rows)))
    return outs
