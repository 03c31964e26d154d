"""DPO with LoRA on the Llama-1.1B shape: lmforge's loop against TRL's DPOTrainer, in one job.

    PYTHONPATH=src python -m bench.train.dpo_gpu [--batch 4] [--seq 1024] [--warmup 3] [--steps 10] [--out DIR]
    PYTHONPATH=src python -m bench.train.dpo_gpu --trl plain compile checkpointing    # more TRL rows
    PYTHONPATH=src python -m bench.train.dpo_gpu --attention fa4    # ours with FlashAttention-4 (lmforge[gpu])
    PYTHONPATH=src python -m bench.train.dpo_gpu --checkpointing --trl checkpointing   # both recompute activations
    python -m bench.train.dpo_gpu --tiny    # a CPU check of this script in seconds

Needs torch, transformers, peft and pydantic; the baseline also trl and datasets (``pip install
'lmforge[bench]'``; without trl the baseline is skipped and says so). Both sides train the same
random-weight model built from the TinyLlama-1.1B config (hidden 2048, 22 layers, 32 heads, 4 KV
heads, vocabulary 32000, untied embeddings) with LoRA r=16, alpha 32, no dropout, on all linear
layers of the blocks, AdamW at 1e-4, DPO's sigmoid loss at beta 0.1, on the same pairs: random
tokens, a prompt of ``seq/4`` tokens and answers that fill the rest of ``--seq`` with EOS (so neither
side pads), ``--batch`` pairs per step. A word-level tokenizer (``w<id>`` per token) makes TRL,
which tokenizes text, see exactly those token ids.

Ours: :func:`lmforge.train.loop.train_phase` with the engine's GPU settings (blocks compiled, bf16
frozen base, chosen and rejected in one forward, answer log-probs through the output layer in
chunks); DPO's reference scored once before the first step (:func:`lmforge.train.preference_data.
attach_reference`), its time for the timed pairs added to ours. TRL: ``DPOTrainer`` with
``peft_config`` (reference = the adapter disabled, computed every step), the base loaded in bf16,
``bf16=True``; row ``plain`` without gradient checkpointing (the same work as ours; TRL's default
turns it on), ``checkpointing`` with it, ``compile`` with ``torch_compile``. Tokens/s count both
answers' full sequences (2 x batch x seq per step) over the timed steps after ``--warmup``; peak
memory is ``torch.cuda.max_memory_allocated`` over the whole row. Raw rows go to
OUT/train_dpo_gpu_raw.jsonl, figures with their baseline to OUT/train_dpo_gpu.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import record

BENCH = "train_dpo_gpu"
TRL_ROWS = ("plain", "checkpointing", "compile")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EOS, PAD = 0, 1  # token ids of the word-level tokenizer; words start at 2
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                intermediate_size=5632, max_seq_len=2048, tie_embeddings=False)
TINY_LLAMA = dict(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                  max_seq_len=64, tie_embeddings=False)
BETA, LR = 0.1, 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (2x sequences)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (prompt + answer + EOS)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--attention", default="auto", choices=("auto", "flash", "cudnn", "efficient", "fa4"),
                        help="ours: training.speed.attention_backend")
    parser.add_argument("--checkpointing", action="store_true",
                        help="ours with training.speed.gradient_checkpointing (compared with TRL's checkpointing row)")
    parser.add_argument("--logprob-chunk-mib", type=int, default=None,
                        help="ours: float32 logits per answer log-prob chunk (default: the engine's LOGPROB_CHUNK_BYTES)")
    parser.add_argument("--trl", nargs="*", default=["plain"], help=f"TRL rows to measure: {' '.join(TRL_ROWS)}")
    add_common_arguments(parser, "a tiny Llama on the CPU, seq 64, batch 2, 1 + 2 steps: a check of this script")
    args = parser.parse_args(argv)
    args.trl = choose(args.trl, TRL_ROWS, "TRL row", "--trl")
    if args.tiny:
        args.batch, args.seq, args.warmup, args.steps = 2, 64, 1, 2
    return args


def make_pairs(n: int, vocab: int, seq: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prompt, chosen, rejected) token lists of random words; prompt + answer + EOS = ``seq``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt_len = seq // 4
    answer = seq - prompt_len - 1

    def words(k: int) -> list[int]:
        return torch.randint(2, vocab, (k,), generator=g).tolist()

    return [(words(prompt_len), [*words(answer), EOS], [*words(answer), EOS]) for _ in range(n)]


def pair_rows(pairs: list[tuple[list[int], list[int], list[int]]]) -> dict:
    """Our rows of ``pairs`` (what lmforge.train.preference_data.encode_preferences builds from records)."""
    import torch

    from lmforge.data.packing import IGNORE_INDEX

    seq = len(pairs[0][0]) + len(pairs[0][1])
    ids = torch.tensor([[p + c, p + r] for p, c, r in pairs])
    labels = ids.clone()
    labels[:, :, : len(pairs[0][0])] = IGNORE_INDEX  # the prompt is not scored
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "seq": seq}


def ours(cfg: dict, pairs: list, batch: int, warmup: int, steps: int, device, attention: str = "auto",
         checkpointing: bool = False) -> dict:
    """lmforge's DPO + LoRA row: the reference pass for the timed pairs plus the timed steps."""
    import torch

    from lmforge.config.model import ModelConfig
    from lmforge.config.training import LoggingConfig, PhaseConfig, TrainingConfig
    from lmforge.model.build import build_model
    from lmforge.train.accel import speed
    from lmforge.train.loop import train_phase
    from lmforge.train.methods.catalog import apply_method
    from lmforge.train.preference_data import attach_reference

    cuda = device.type == "cuda"
    training = TrainingConfig.model_validate({
        "method": "dpo", "preference": {"beta": BETA}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                                                               "target_modules": LINEAR},
        "placement": {"use_gpu": cuda, "use_ray": False}, "speed": {"compile": cuda, "attention_backend": attention,
                                                                 "gradient_checkpointing": checkpointing},
        "optimizer": {"weight_decay": 0.0}, "logging": LoggingConfig(every=warmup)})
    torch.manual_seed(0)
    with device:
        model = build_model(ModelConfig(architecture="llama", **cfg), cfg["vocab_size"])
    speed.apply_settings(model, training.speed, device)  # the engine's own steps (lmforge.train.worker)
    model = apply_method(model, training)
    if cuda:
        speed.freeze_to_bf16(model)
    rows = pair_rows(pairs)
    seq = rows.pop("seq")
    warm = {k: v[: warmup * batch] for k, v in rows.items()}
    timed = {k: v[warmup * batch:] for k, v in rows.items()}
    warm = attach_reference(model, {"train": warm}, batch, device)["train"]  # compiles the no-grad path too
    _sync(device)
    began = time.perf_counter()
    timed = attach_reference(model, {"train": timed}, batch, device)["train"]
    _sync(device)
    reference_s = time.perf_counter() - began

    def batches() -> Iterator[dict]:
        for data, n in ((warm, warmup), (timed, steps)):
            for i in range(n):
                yield {k: v[i * batch:(i + 1) * batch] for k, v in data.items()}

    marks: dict[int, float] = {}
    phase = PhaseConfig(steps=warmup + steps, learning_rate=LR, batch_size=batch, seq_len=seq, warmup_steps=0,
                        schedule="constant")
    train_phase(model, "finetune", phase, training, batches(), [], device,
                on_log=lambda r: marks.__setitem__(r["step"], time.perf_counter()))
    train_s = marks[warmup + steps] - marks[warmup]
    options = [o for o in (attention if attention != "auto" else "", "checkpointing" if checkpointing else "") if o]
    return {"row": f"lmforge[{','.join(options)}]" if options else "lmforge", "reference_s": round(reference_s, 3),
            "train_s": round(train_s, 3), "elapsed_s": round(reference_s + train_s, 3)}


def word_tokenizer(vocab: int):
    """A tokenizer whose word ``w<i>`` is token ``i``: TRL tokenizes text, and must see our token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<eos>": EOS, "<pad>": PAD, **{f"w{i}": i for i in range(2, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")


def trl_row(cfg: dict, pairs: list, batch: int, warmup: int, steps: int, device, variant: str) -> dict:
    """TRL's DPOTrainer with peft's LoRA on the same model, pairs, batch and sequence length."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = device.type == "cuda"
    tokenizer = word_tokenizer(cfg["vocab_size"])

    def text(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i != EOS)  # TRL appends the EOS token itself

    data = datasets.Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                                       for p, c, r in pairs])
    seq = len(pairs[0][0]) + len(pairs[0][1])
    config = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                         num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_heads"],
                         num_key_value_heads=cfg["num_kv_heads"], intermediate_size=cfg["intermediate_size"],
                         max_position_embeddings=cfg["max_seq_len"], tie_word_embeddings=False,
                         eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    marks: dict[int, float] = {}

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                _sync(device)
                marks[state.global_step] = time.perf_counter()

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=batch,
                     max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, beta=BETA, max_length=seq,
                     bf16=cuda, use_cpu=not cuda, gradient_checkpointing=variant == "checkpointing",
                     torch_compile=variant == "compile", logging_steps=warmup + steps, save_strategy="no",
                     report_to=[], dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR,
                                                task_type="CAUSAL_LM"), callbacks=[Marks()])
    trainer.train()
    return {"row": f"trl_{variant}", "elapsed_s": round(marks[warmup + steps] - marks[warmup], 3)}


def measure(name: str, call: Callable[[], dict], device, timed_tokens: int) -> dict:
    """One row: its timing, tokens/s over the timed steps, peak memory; an error is recorded, not raised."""
    import torch

    row: dict = {"row": name}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row.update(call())
        row["tokens_per_s"] = round(timed_tokens / row["elapsed_s"])
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc)[:160]}"
    except Exception as exc:  # noqa: BLE001 - one broken row must not cost the job's other rows
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.logprob_chunk_mib:
        from lmforge.train import objective

        objective.LOGPROB_CHUNK_BYTES = args.logprob_chunk_mib << 20

    out = out_dir(args)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: measuring on the CPU (figures say so)", flush=True)
    cfg = TINY_LLAMA if args.tiny else LLAMA_1B
    pairs = make_pairs((args.warmup + args.steps) * args.batch, cfg["vocab_size"], args.seq)
    common = (cfg, pairs, args.batch, args.warmup, args.steps, device)
    timed_tokens = args.steps * 2 * args.batch * args.seq  # chosen and rejected, no padding
    rows = [measure("lmforge", lambda: ours(*common, args.attention, args.checkpointing), device, timed_tokens)]
    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        print("TRL baseline skipped: trl (and datasets) not installed: pip install 'lmforge[bench]'", flush=True)
    else:
        rows += [measure(f"trl_{v}", lambda v=v: trl_row(*common, v), device, timed_tokens) for v in args.trl]
    with (out / f"{BENCH}_raw.jsonl").open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**row, "batch": args.batch, "seq": args.seq, "device": str(device)}) + "\n")
    write_figures(rows, out, "llama_1.1b" if not args.tiny else "tiny_llama", args)
    return 0 if "error" not in rows[0] else 1


def write_figures(rows: list[dict], out: Path, shape: str, args: argparse.Namespace) -> None:
    """Our tokens/s and peak memory against the first TRL row that ran (None when none did)."""
    mine = rows[0]
    if "error" in mine:
        return
    ran = [r for r in rows[1:] if "error" not in r]
    # Like with like: our checkpointing row against TRL's, else the first TRL row that ran.
    baseline = next((r for r in ran if r["row"] == "trl_checkpointing"), None) if args.checkpointing else None
    baseline = baseline or (ran[0] if ran else None)
    label = (f"TRL DPOTrainer {baseline['row'].removeprefix('trl_')} (peft LoRA, bf16 base), same job"
             if baseline else "TRL DPOTrainer (not run)")
    tag = (f"{shape}_dpo_lora_b{args.batch}_s{args.seq}" + ("" if args.attention == "auto" else f"_{args.attention}")
           + ("_checkpointing" if args.checkpointing else "")
           + (f"_chunk{args.logprob_chunk_mib}mib" if args.logprob_chunk_mib else ""))
    record(BENCH, f"{tag}_tokens_per_s", mine["tokens_per_s"], "tokens/s", label,
           baseline["tokens_per_s"] if baseline else None, out_dir=out)
    if "peak_gib" in mine:
        record(BENCH, f"{tag}_peak_gib", mine["peak_gib"], "GiB", label,
               baseline.get("peak_gib") if baseline else None, higher_is_better=False, out_dir=out)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    run(main)
