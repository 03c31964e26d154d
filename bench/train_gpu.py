"""Training throughput on one GPU: plain transformers/peft loops against lmforge's engine, in one job.

    PYTHONPATH=src python bench/train_gpu.py [--only gpt2,llama_full,llama_lora,ablations] [--out DIR]
    PYTHONPATH=src python bench/train_gpu.py --only gpt2_baselines,llama_fa4,llama_fp8 --gpt2 "model,fa4,graphs"

(the second is the current best settings with their baselines; ``fa4`` needs the flash-attn-4 and
nvidia-cutlass-dsl packages, ``fp8`` torchao: ``pip install 'lmforge[gpu]'``).

Needs only torch, transformers and peft (plus pydantic, which lmforge's configs use). Synthetic
random tokens, packed (no padding). Workloads, as in issue 5:

- GPT-2 124M pretraining, sequence 1024, batch 16;
- Llama-shaped 1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, vocabulary 32000, untied
  embeddings), sequence 2048, batch 8: full fine-tuning, and LoRA r=16 on all linear layers.

Baselines, measured in the same process: a plain loop (float32 weights, bf16 autocast, AdamW,
SDPA attention, the model's own loss, gradient clipping), the same with ``torch.compile(model)``,
and for LoRA the same plain loop over a peft model. Ours: :func:`lmforge.train.loop.train_phase`,
the engine's one loop, with its GPU settings (blocks compiled one by one, fused AdamW, the chunked
fused output-layer cross-entropy, embeddings padded to a multiple of 64, bf16 frozen base for LoRA).
Each optimization is also measured alone on top of the plain loop (``plain+X`` rows).

MFU = (6·N + 12·L·h·S) · tokens/s / 989e12: N all parameters (tied once), L layers, h hidden size,
S sequence length, 989 TFLOP/s the H100's dense bf16 peak. For LoRA the same 6·N convention is
kept (its backward skips weight gradients of the frozen base, so its true FLOPs are lower).
Raw rows go to OUT/train_gpu_raw.jsonl as each variant finishes, and figures with their baselines
to OUT/train_gpu.jsonl through bench/_record.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _idle_gaps import idle_gaps  # noqa: E402
from _train_records import ABLATIONS, write_records  # noqa: E402
from lmforge.config.training import LoraConfig, ModelConfig, PhaseConfig, TrainingConfig  # noqa: E402
from lmforge.model.build import count_parameters, model_config  # noqa: E402
from lmforge.model.info import mfu, train_flops_per_token  # noqa: E402
from lmforge.train.accel import speed  # noqa: E402
from lmforge.train.data import batch_stream  # noqa: E402
from lmforge.train.objective import CausalLMObjective  # noqa: E402
from lmforge.train import loop  # noqa: E402
from lmforge.train.loop import train_phase  # noqa: E402
from lmforge.train.methods.catalog import apply_method  # noqa: E402

GPT2_BEST = ("model,cudnn", "model,liger,cudnn")
GPT2_SETTINGS = {  # engine settings beyond its defaults (blocks compiled, torch fused loss, SDPA's choice)
    "model": dict(compile_scope="model"),
    "model,cudnn": dict(compile_scope="model", attention_backend="cudnn"),
    "blocks,cudnn": dict(attention_backend="cudnn"),
    "liger,cudnn": dict(loss_kernel="liger", attention_backend="cudnn"),
    "model,liger,cudnn": dict(compile_scope="model", loss_kernel="liger", attention_backend="cudnn"),
    "model,fa4": dict(compile_scope="model", attention_backend="fa4"),
    "blocks,fa4": dict(attention_backend="fa4"),
    "model,fa4,graphs": dict(compile_scope="model", attention_backend="fa4", cuda_graphs=True),
    "model,cudnn,graphs": dict(compile_scope="model", attention_backend="cudnn", cuda_graphs=True),
    "model,fa4,graphs,fp8": dict(compile_scope="model", attention_backend="fa4", cuda_graphs=True, fp8=True),
    "model,fa4,fp8": dict(compile_scope="model", attention_backend="fa4", fp8=True),
    "model,fa4,graphs,bf16res": dict(compile_scope="model", attention_backend="fa4", cuda_graphs=True,
                                     residual_dtype="bfloat16"),
    "model,cudnn,graphs,bf16res": dict(compile_scope="model", attention_backend="cudnn", cuda_graphs=True,
                                       residual_dtype="bfloat16"),
    "model,fa4,graphs,bf16res,opt": dict(compile_scope="model", attention_backend="fa4", cuda_graphs=True,
                                         residual_dtype="bfloat16", compile_optimizer=True),
    "model,cudnn,graphs,bf16res,opt": dict(compile_scope="model", attention_backend="cudnn", cuda_graphs=True,
                                           residual_dtype="bfloat16", compile_optimizer=True),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "gpt2": dict(model=ModelConfig(architecture="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                                   num_kv_heads=12, intermediate_size=3072, max_seq_len=1024),
                 vocab=50257, batch=16, seq=1024),
    "llama": dict(model=ModelConfig(architecture="llama", vocab_size=32000, hidden_size=2048, num_layers=22,
                                    num_heads=32, num_kv_heads=4, intermediate_size=5632, max_seq_len=2048,
                                    tie_embeddings=False),
                  vocab=32000, batch=8, seq=2048),
}
TINY = {  # --tiny: the same code paths on a CPU in seconds (a check of this script, not a benchmark)
    "gpt2": dict(model=ModelConfig(architecture="gpt2", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=4, intermediate_size=128, max_seq_len=64), vocab=300, batch=4, seq=64),
    "llama": dict(model=ModelConfig(architecture="llama", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=128, max_seq_len=64, tie_embeddings=False),
                  vocab=300, batch=4, seq=64),
}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.shapes = TINY if args.tiny else SHAPES
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {}
        self.deadline = time.monotonic() + args.budget_s

    def run(self, name: str, shape: str, build: Callable[[], tuple[Callable[[int], None], torch.nn.Module]],
            warmup: int, steps: int) -> None:
        """Build a variant, run ``warmup`` steps (compilation), then time ``steps`` steps."""
        if time.monotonic() > self.deadline:
            print(f"skip {name}: out of time budget", flush=True)
            return
        s = self.shapes[shape]
        row = {"variant": name, "shape": shape, "batch": s["batch"], "seq": s["seq"]}
        try:
            _sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            run_steps, model = build()
            if hasattr(run_steps, "phase"):  # the engine: warm-up and timed steps in one phase
                _, elapsed, last_loss = run_steps.phase(warmup, steps)
                row["warmup_s"] = round(time.perf_counter() - started - elapsed, 1)
            else:
                run_steps(warmup)
                _sync(self.device)
                row["warmup_s"] = round(time.perf_counter() - started, 1)
                begin = time.perf_counter()
                last_loss = run_steps(steps)
                _sync(self.device)
                elapsed = time.perf_counter() - begin
            if last_loss is not None:  # the engine's mean loss over its last logged window: a sanity check
                row["loss_last"] = round(last_loss, 4)
            tokens = steps * s["batch"] * s["seq"]
            params = count_parameters(model)
            flops = train_flops_per_token(params, s["model"].num_layers, s["model"].hidden_size, s["seq"])
            row.update(tokens_per_s=round(tokens / elapsed), params=params, trainable=count_parameters(model, True),
                       mfu=round(mfu(tokens / elapsed, flops), 4), step_ms=round(1000 * elapsed / steps, 1))
            if self.device.type == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.cuda.OutOfMemoryError as exc:  # record it and go on with the next variant
            row["error"] = f"out of memory: {str(exc)[:120]}"
        except Exception as exc:  # noqa: BLE001 - one broken variant must not cost the job's other rows
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            run_steps = model = None  # noqa: F841 - free the variant before the next one
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows[name] = row
        with (self.out / "train_gpu_raw.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def profile(self, name: str, build: Callable[[], tuple[Callable[[int], None], torch.nn.Module]],
                warmup: int, steps: int = 3) -> None:
        """Where a variant's GPU time goes: the top kernels of ``steps`` profiled steps, to OUT/profile_*.txt."""
        from torch.profiler import ProfilerActivity, profile

        run_steps, _ = build()
        cuda = self.device.type == "cuda"
        prof = profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU])
        _, elapsed, _ = run_steps.phase(warmup, steps, at_warmup=prof.start)  # profiles the steps after warm-up
        prof.stop()
        events = prof.key_averages()
        if cuda:  # GPU busy time against wall time: the gap is the GPU waiting for the host
            busy = sum(e.self_device_time_total for e in events) / 1000 / steps
            print(f"GPU busy {busy:.1f} ms per step; wall {1000 * elapsed / steps:.1f} ms (profiled)",
                  flush=True)
        table = events.table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30,
                                          max_name_column_width=90)
        table += "\n" + idle_gaps(prof, cuda, steps)
        slug = "".join(c if c.isalnum() else "_" for c in name)
        (self.out / f"profile_{slug}.txt").write_text(table)
        print(table, flush=True)

    # ------------------------------------------------------------ the variants

    def plain(self, shape: str, lora: bool = False, compile_model: bool = False, fused_adamw: bool = False,
              vocab64: bool = False, fused_loss: bool = False, compile_blocks: bool = False, bf16_base: bool = False):
        """A plain loop; each keyword switches on one optimization of the engine."""
        from transformers import AutoModelForCausalLM

        def build():
            s = self.shapes[shape]
            cfg = s["model"].model_copy(update={"vocab_multiple": 64 if vocab64 else 1})
            with self.device:
                model = AutoModelForCausalLM.from_config(model_config(cfg, s["vocab"]), attn_implementation="sdpa")
            if lora:
                from peft import LoraConfig as PeftLora, get_peft_model

                model = get_peft_model(model, PeftLora(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LINEAR,
                                                       task_type="CAUSAL_LM"))
            if bf16_base:
                speed.freeze_to_bf16(model)
            if compile_blocks:
                speed.compile_blocks(model)
            net = torch.compile(model) if compile_model else model
            objective = CausalLMObjective(net, fused=True, compile_chunks=self.device.type == "cuda") if fused_loss else None
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95), fused=fused_adamw or None)
            data = _random_batches(s, 4, self.device)

            def run_steps(n: int) -> None:
                for i in range(n):
                    ids = data[i % len(data)]
                    with _autocast(self.device):
                        loss = objective(ids, ids) / (ids.numel() - len(ids)) if objective else net(input_ids=ids, labels=ids).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return run_steps, model
        return build

    def engine(self, shape: str, method: str, vocab_multiple: int = 64, pageable: bool = False, **overrides):
        """lmforge's own path: ``train_phase`` with the engine's GPU settings (``overrides`` switch some off;
        ``pageable``: host-to-GPU copies from ordinary memory, as before the loop pinned them)."""
        def build():
            s = self.shapes[shape]
            cfg = s["model"].model_copy(update={"vocab_multiple": vocab_multiple})
            settings = {"compile": True, "fused_loss": True, **overrides}
            training = TrainingConfig(method=method, use_gpu=self.device.type == "cuda", use_ray=False, log_every=10**6,
                                      weight_decay=0.01, lora=LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=LINEAR),
                                      **settings)
            from lmforge.model.build import build_model

            torch.manual_seed(0)  # the same initial weights in every row: loss_last is comparable
            with self.device:
                model = build_model(cfg, s["vocab"])
            if method == "qlora":  # reloads the saved base in 4-bit NF4, as the engine does
                import tempfile

                base_dir = Path(tempfile.mkdtemp())
                model.save_pretrained(base_dir)
                model = apply_method(model, training, base_dir, self.device)
            speed.apply_settings(model, training, self.device)  # the engine's own steps (lmforge.train.worker)
            if method not in ("pretrain", "full", "qlora"):
                model = apply_method(model, training)
                if self.device.type == "cuda":
                    speed.freeze_to_bf16(model)
            rows = _random_rows(s, 64)
            batches = batch_stream(rows, s["batch"], seed=0)
            name = "pretrain" if method == "pretrain" else "finetune"

            def run_steps(n: int) -> float:
                phase = PhaseConfig(steps=n, learning_rate=1e-4, batch_size=s["batch"], seq_len=s["seq"], warmup_steps=0)
                return train_phase(model, name, phase, training, batches, [], self.device)[1][f"{name}_loss"]

            def phase(warmup: int, steps: int, at_warmup: Callable[[], None] | None = None):
                """(warm-up s, timed s, loss) of one phase of warmup + steps: one compilation and one CUDA-graph
                recording, as in a real run (a second phase would build a new optimizer and compile its step
                again). The loop synchronizes at its logs, which come every ``warmup`` steps and at the end."""
                marks: dict[int, float] = {}

                def on_log(record: dict) -> None:
                    marks[record["step"]] = time.perf_counter()
                    if record["step"] == warmup and at_warmup is not None:
                        at_warmup()

                cfg = PhaseConfig(steps=warmup + steps, learning_rate=1e-4, batch_size=s["batch"], seq_len=s["seq"],
                                  warmup_steps=0)
                begin = time.perf_counter()
                pinned = loop.to_device
                if pageable:
                    loop.to_device = lambda t, device: t.to(device, non_blocking=True)
                try:
                    _, metrics = train_phase(model, name, cfg, training.model_copy(update={"log_every": warmup}),
                                             batches, [], self.device, on_log=on_log)
                finally:
                    loop.to_device = pinned
                return marks[warmup] - begin, marks[warmup + steps] - marks[warmup], metrics[f"{name}_loss"]

            run_steps.phase = phase
            return run_steps, model
        return build


def _random_batches(s: dict, n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device) for _ in range(n)]


def _random_rows(s: dict, n: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, s["vocab"], (n, s["seq"]), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="gpt2,llama_full,llama_lora,ablations,engine_ablations")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--budget-s", type=float, default=330, help="skip variants that would start after this")
    parser.add_argument("--gpt2", default="", help="GPT-2 engine settings to run, ';'-separated GPT2_SETTINGS keys")
    parser.add_argument("--profile", choices=sorted(GPT2_SETTINGS), help="profile this GPT-2 engine setting")
    parser.add_argument("--gpt2-steps", type=int, default=20, help="timed steps of every GPT-2 row")
    parser.add_argument("--gpt2-warmup", type=int, default=10,
                        help="warm-up steps of the GPT-2 engine rows, also their log (and synchronization) cadence")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: check the script runs")
    args = parser.parse_args(argv)
    if args.gpt2_warmup < 1:
        parser.error("--gpt2-warmup must be at least 1 (the timed steps start after its log)")
    bench = Bench(args)
    only = set(args.only.split(","))
    g, l = (4, 3) if not args.tiny else (1, 1)  # noqa: E741 - warm-up steps (compile happens there)
    gs = args.gpt2_steps  # timed steps of each GPT-2 row
    if "gpt2" in only:
        bench.run("gpt2/plain", "gpt2", bench.plain("gpt2"), warmup=g, steps=gs)
        bench.run("gpt2/plain+torch.compile", "gpt2", bench.plain("gpt2", compile_model=True), warmup=g, steps=gs)
        bench.run("gpt2/lmforge", "gpt2", bench.engine("gpt2", "pretrain"), warmup=g, steps=gs)
    if "gpt2_compile" in only:  # the compile baseline alone (for jobs that re-measure only the best settings)
        bench.run("gpt2/plain+torch.compile", "gpt2", bench.plain("gpt2", compile_model=True), warmup=g, steps=gs)
    if "gpt2_scopes" in only or "gpt2_best" in only:  # compile scope, attention kernel and loss kernel choices
        chosen = GPT2_SETTINGS if "gpt2_scopes" in only else {k: GPT2_SETTINGS[k] for k in GPT2_BEST}
        for name, settings in chosen.items():
            bench.run(f"gpt2/lmforge[{name}]", "gpt2", bench.engine("gpt2", "pretrain", **settings), warmup=g, steps=gs)
    if "gpt2_baselines" in only:  # the plain loop and plain + torch.compile, nothing of ours
        bench.run("gpt2/plain", "gpt2", bench.plain("gpt2"), warmup=g, steps=gs)
        bench.run("gpt2/plain+torch.compile", "gpt2", bench.plain("gpt2", compile_model=True), warmup=g, steps=gs)
    if "llama_fa4" in only:  # FlashAttention-4 (head dim 64 here too) on the Llama workloads, with baselines
        bench.run("llama_full/plain", "llama", bench.plain("llama"), warmup=l, steps=8)
        bench.run("llama_full/lmforge[fa4]", "llama", bench.engine("llama", "full", attention_backend="fa4"),
                  warmup=l, steps=8)
        bench.run("llama_lora/peft", "llama", bench.plain("llama", lora=True), warmup=l, steps=8)
        bench.run("llama_lora/lmforge[fa4]", "llama", bench.engine("llama", "lora", attention_backend="fa4"),
                  warmup=l, steps=8)
    if "llama_fp8" in only:
        bench.run("llama_full/lmforge[fa4,fp8]", "llama",
                  bench.engine("llama", "full", attention_backend="fa4", fp8=True), warmup=l, steps=8)
    # GPT-2 engine settings by name, in the order given.
    ge = args.gpt2_warmup if not args.tiny else 1  # the engine's warm-up: compilation, CUDA-graph recording
    for name in filter(None, args.gpt2.split(";")):  # e.g. --gpt2 "model,cudnn;model,fa4;model,fa4+pageable"
        setting, pageable = name.removesuffix("+pageable"), name.endswith("+pageable")
        bench.run(f"gpt2/lmforge[{name}]", "gpt2", bench.engine("gpt2", "pretrain", pageable=pageable,
                                                                 **GPT2_SETTINGS[setting]), warmup=ge, steps=gs)
    if args.profile:  # e.g. --profile model,cudnn: the GPT-2 engine with those GPT2_SETTINGS
        bench.profile(f"gpt2/lmforge[{args.profile}]", bench.engine("gpt2", "pretrain", **GPT2_SETTINGS[args.profile]),
                      warmup=ge)
    if "llama_full" in only:
        bench.run("llama_full/plain", "llama", bench.plain("llama"), warmup=l, steps=8)
        bench.run("llama_full/lmforge", "llama", bench.engine("llama", "full"), warmup=l, steps=8)
    if "llama_full_model" in only:
        bench.run("llama_full/lmforge[model]", "llama", bench.engine("llama", "full", compile_scope="model"),
                  warmup=l, steps=8)
    if "llama_lora" in only:
        bench.run("llama_lora/peft", "llama", bench.plain("llama", lora=True), warmup=l, steps=8)
        bench.run("llama_lora/lmforge", "llama", bench.engine("llama", "lora"), warmup=l, steps=8)
    if "llama_lora_model" in only:
        bench.run("llama_lora/lmforge[model]", "llama", bench.engine("llama", "lora", compile_scope="model"),
                  warmup=l, steps=8)
    if "qlora" in only:  # bitsandbytes NF4 base; blocks are not compiled (its 4-bit matmuls break graphs)
        bench.run("llama_qlora/lmforge", "llama", bench.engine("llama", "qlora", compile=False), warmup=l, steps=8)
    if "llama_cudnn" in only:  # the cuDNN attention kernel on the Llama workloads
        bench.run("llama_full/lmforge[cudnn]", "llama", bench.engine("llama", "full", attention_backend="cudnn"),
                  warmup=l, steps=8)
        bench.run("llama_lora/lmforge[cudnn]", "llama", bench.engine("llama", "lora", attention_backend="cudnn"),
                  warmup=l, steps=8)
    if "qlora_more" in only:  # QLoRA as it is used for memory: with checkpointing; and with compiled blocks
        bench.run("llama_qlora/lmforge+checkpointing", "llama",
                  bench.engine("llama", "qlora", compile=False, gradient_checkpointing=True), warmup=l, steps=8)
        bench.run("llama_qlora/lmforge[blocks]", "llama", bench.engine("llama", "qlora"), warmup=l, steps=8)
    if "checkpointing" in only:  # compile together with gradient checkpointing
        bench.run("llama_full/lmforge+checkpointing", "llama",
                  bench.engine("llama", "full", gradient_checkpointing=True), warmup=l, steps=8)
    if "ablations" in only:
        for flag in ABLATIONS:
            bench.run(f"gpt2/plain+{flag}", "gpt2", bench.plain("gpt2", **{flag: True}), warmup=g, steps=gs)
        bench.run("llama_lora/peft+bf16_base", "llama", bench.plain("llama", lora=True, bf16_base=True), warmup=l, steps=8)
        bench.run("llama_full/plain+fused_loss", "llama", bench.plain("llama", fused_loss=True), warmup=l, steps=8)
    if "compile_ablation" in only:  # the one plain+X row whose X changed since an earlier job
        bench.run("gpt2/plain+compile_blocks", "gpt2", bench.plain("gpt2", compile_blocks=True), warmup=g, steps=gs)
    if "engine_ablations" in only:  # the engine with one of its optimizations switched off
        bench.run("gpt2/lmforge-fused_loss", "gpt2", bench.engine("gpt2", "pretrain", fused_loss=False), warmup=g, steps=gs)
        bench.run("gpt2/lmforge-vocab64", "gpt2", bench.engine("gpt2", "pretrain", vocab_multiple=1), warmup=g, steps=gs)
    write_records(bench)
    return 0


if __name__ == "__main__":
    sys.exit(main())
