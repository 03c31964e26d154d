"""CPU benchmark of unmerged multi-LoRA serving: output tokens/s of a batch mixing two LoRA adapters
over one base (``serving.adapters``) against one adapter merged into the base, served alone.

    python -m bench.serve.lora_cpu [--out DIR] [--tiny]

The model is a random Llama (hidden 256, 4 layers, vocabulary 8000, float32); the adapters are
random peft LoRA adapters of rank 16 on every projection (q, k, v, o, gate, up, down). Eight
concurrent requests of 64 prompt tokens and 128 new tokens (EOS ignored): in the mixed run four use
adapter ``a`` and four adapter ``b``; in the baseline all eight run the merged model. The ratio is
the price of choosing the adapter per request instead of serving one merged model. Medians of five
rounds that alternate between the two engines. ``--tiny``: a 2-layer model, rank 4, 16 new tokens,
one round (a check of this script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common.cli import add_common_arguments, out_dir, run
from bench.common.record import record
from bench.common.serve import (
    engine_tokens_per_s,
    random_llama,
    random_prompts,
    word_tokenizer,
)
from lmforge.config.serving import RuntimeConfig, SchedulerConfig, ServingConfig
from lmforge.serving.engine import Engine

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Sizes:
    """The model, the requests (prompt and new tokens, how many at once), the adapters' rank and the rounds."""

    shape: dict
    prompt: int
    new: int
    concurrent: int
    rank: int
    rounds: int


FULL = Sizes(dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512),
             prompt=64, new=128, concurrent=8, rank=16, rounds=5)
TINY = Sizes(dict(FULL.shape, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512), prompt=16, new=16, concurrent=4, rank=4, rounds=1)


def save_adapter(base_dir: Path, out: Path, seed: int, rank: int) -> Path:
    """A random (not zero-initialized) LoRA adapter over the model in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(out)
    return out


def merged(base_dir: Path, adapter: Path, cfg: ServingConfig, vocab: int) -> Engine:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    return Engine(model.eval(), word_tokenizer(vocab), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "a 2-layer model, short requests, one round: a check of this script")
    args = parser.parse_args()
    out, z = out_dir(args), TINY if args.tiny else FULL
    cfg = ServingConfig(runtime=RuntimeConfig(device="cpu"),
                        scheduler=SchedulerConfig(max_batch_size=z.concurrent, max_queue=1024))
    prompts = random_prompts(z.concurrent, z.prompt, z.shape["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        random_llama(z.shape, "cpu", torch.float32).save_pretrained(base_dir)
        word_tokenizer(z.shape["vocab_size"]).save_pretrained(base_dir)
        a, b = (save_adapter(base_dir, Path(tmp) / name, seed, z.rank) for name, seed in (("a", 1), ("b", 2)))
        one = merged(base_dir, a, cfg, z.shape["vocab_size"])
        multi = Engine.load(base_dir, cfg=cfg.model_copy(update={"adapters": {"a": str(a), "b": str(b)}}))
        # Rounds alternate between the engines, so a load change on a shared machine hits both alike.
        rates: dict[str, list[float]] = {"single": [], "mixed": [], "base_only": []}
        for _ in range(z.rounds):
            rates["single"].append(engine_tokens_per_s(one, prompts, z.new, repeats=1))
            rates["mixed"].append(engine_tokens_per_s(multi, prompts, z.new, 1, ["a", "b"] * (z.concurrent // 2)))
            rates["base_only"].append(engine_tokens_per_s(multi, prompts, z.new, repeats=1))
        one.close()
        multi.close()
    single, mixed, base_only = (statistics.median(rates[k]) for k in ("single", "mixed", "base_only"))
    baseline = "one adapter merged into the base, served alone (same run)"
    command = "python -m bench.serve.lora_cpu" + (" --tiny" if args.tiny else "")
    for metric, value in ((f"two_adapters_mixed_{z.concurrent}_stream_tok_s", mixed),
                          (f"base_requests_with_adapters_loaded_{z.concurrent}_stream_tok_s", base_only)):
        record("serve_lora_cpu", metric, value, "output tok/s", baseline, single, command=command, out_dir=out)
        print(json.dumps({"metric": metric, "value": round(value, 1), "baseline_value": round(single, 1)}), flush=True)
    print(f"records in {out}")


if __name__ == "__main__":
    started = time.perf_counter()
    try:
        run(main)
    finally:
        print(f"total {time.perf_counter() - started:.0f} s")
