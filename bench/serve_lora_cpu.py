"""CPU benchmark of unmerged multi-LoRA serving: output tokens/s of a batch mixing two LoRA adapters
over one base (``serving.adapters``) against one adapter merged into the base, served alone.

    python bench/serve_lora_cpu.py [--results DIR]

The model is a random Llama (hidden 256, 4 layers, vocabulary 8000, float32); the adapters are
random peft LoRA adapters of rank 16 on every projection (q, k, v, o, gate, up, down). Eight
concurrent requests of 64 prompt tokens and 128 new tokens (EOS ignored): in the mixed run four use
adapter ``a`` and four adapter ``b``; in the baseline all eight run the merged model. The ratio is
the price of choosing the adapter per request instead of serving one merged model. Medians of five
rounds that alternate between the two engines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402
from serve_common import engine_tokens_per_s, random_llama, random_prompts, word_tokenizer  # noqa: E402

from lmforge.config.serving import ServingConfig  # noqa: E402
from lmforge.serving.engine import Engine  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512)
PROMPT, NEW, CONCURRENT, RANK, ROUNDS = 64, 128, 8, 16, 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A random (not zero-initialized) LoRA adapter over the model in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(out)
    return out


def merged(base_dir: Path, adapter: Path, cfg: ServingConfig) -> Engine:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()
    return Engine(model.eval(), word_tokenizer(SHAPE["vocab_size"]), cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    cfg = ServingConfig(device="cpu", max_batch_size=CONCURRENT, max_queue=1024)
    prompts = random_prompts(CONCURRENT, PROMPT, SHAPE["vocab_size"])
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        random_llama(SHAPE, "cpu", torch.float32).save_pretrained(base_dir)
        word_tokenizer(SHAPE["vocab_size"]).save_pretrained(base_dir)
        a, b = save_adapter(base_dir, Path(tmp) / "a", 1), save_adapter(base_dir, Path(tmp) / "b", 2)
        one = merged(base_dir, a, cfg)
        multi = Engine.load(base_dir, cfg=cfg.model_copy(update={"adapters": {"a": str(a), "b": str(b)}}))
        # Rounds alternate between the engines, so a load change on a shared machine hits both alike.
        rates: dict[str, list[float]] = {"single": [], "mixed": [], "base_only": []}
        for _ in range(ROUNDS):
            rates["single"].append(engine_tokens_per_s(one, prompts, NEW, repeats=1))
            rates["mixed"].append(engine_tokens_per_s(multi, prompts, NEW, 1, ["a", "b"] * (CONCURRENT // 2)))
            rates["base_only"].append(engine_tokens_per_s(multi, prompts, NEW, repeats=1))
        one.close()
        multi.close()
    single, mixed, base_only = (statistics.median(rates[k]) for k in ("single", "mixed", "base_only"))
    baseline = "one adapter merged into the base, served alone (same run)"
    for metric, value in ((f"two_adapters_mixed_{CONCURRENT}_stream_tok_s", mixed),
                          (f"base_requests_with_adapters_loaded_{CONCURRENT}_stream_tok_s", base_only)):
        record("serve_lora_cpu", metric, value, "output tok/s", baseline, single, command="python bench/serve_lora_cpu.py",
               out_dir=args.results)
        print(json.dumps({"metric": metric, "value": round(value, 1), "baseline_value": round(single, 1)}), flush=True)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
