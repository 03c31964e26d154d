"""Measuring the rows of ``bench.train.gpu``: build a variant, warm it up, time its steps, record a row.

:class:`Bench` builds each :class:`~bench.train.gpu.variants.Variant` (a plain transformers/peft loop
or the engine's ``train_phase``) on synthetic random tokens, packed (no padding), and keeps one row
per variant (tokens/s, MFU, peak memory, warm-up time) in ``rows`` and in OUT/train_gpu_raw.jsonl.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.train.gpu.idle_gaps import idle_gaps
from bench.train.gpu.variants import EngineRun, PlainLoop, Variant
from lmforge.config.model import ModelConfig
from lmforge.config.training import LoggingConfig, LoraConfig, PhaseConfig, TrainingConfig
from lmforge.model.build import build_model, count_parameters, model_config
from lmforge.model.info import mfu, train_flops_per_token
from lmforge.train import loop
from lmforge.train.accel import speed
from lmforge.train.data import batch_stream
from lmforge.train.loop import train_phase
from lmforge.train.methods.catalog import apply_method
from lmforge.train.objective import CausalLMObjective

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
    """The rows measured so far (``rows``, by variant name) on the GPU; ``tiny``: tiny shapes on the
    CPU, the same code paths in seconds (a check of this benchmark, not a measurement)."""

    def __init__(self, out: Path, tiny: bool = False, budget_s: float = 330) -> None:
        self.device = torch.device("cpu" if tiny else "cuda")
        self.shapes = TINY if tiny else SHAPES
        self.out = out
        self.rows: dict[str, dict] = {}
        self.deadline = time.monotonic() + budget_s

    def build(self, variant: Variant) -> Callable[[], tuple[Callable[[int], None], torch.nn.Module]]:
        if isinstance(variant.loop, PlainLoop):
            return self.plain(variant.shape, variant.loop)
        return self.engine(variant.shape, variant.loop)

    def run(self, variant: Variant) -> None:
        """Build a variant, run its warm-up steps (compilation), then time its steps."""
        name, shape, warmup, steps = variant.name, variant.shape, variant.warmup, variant.steps
        build = self.build(variant)
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
            traceback.print_exc()  # the row keeps the message; the log gets where it came from
        finally:
            run_steps = model = None  # free the variant before the next one
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows[name] = row
        with (self.out / "train_gpu_raw.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def profile(self, variant: Variant, steps: int = 3) -> None:
        """Where an engine variant's GPU time goes: the top kernels of ``steps`` profiled steps after
        its warm-up, to OUT/profile_*.txt."""
        from torch.profiler import ProfilerActivity, profile

        name, warmup = variant.name, variant.warmup
        run_steps, _ = self.build(variant)()
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

    def plain(self, shape: str, flags: PlainLoop):
        """A plain loop; each flag switches on one optimization of the engine."""
        from transformers import AutoModelForCausalLM

        lora, compile_model, fused_adamw, vocab64 = flags.lora, flags.compile_model, flags.fused_adamw, flags.vocab64
        fused_loss, compile_blocks, bf16_base = flags.fused_loss, flags.compile_blocks, flags.bf16_base

        def build():
            s = self.shapes[shape]
            cfg = s["model"].model_copy(update={"vocab_multiple": 64 if vocab64 else 1})
            with self.device:
                model = AutoModelForCausalLM.from_config(model_config(cfg, s["vocab"]), attn_implementation="sdpa")
            if lora:
                from peft import LoraConfig as PeftLora
                from peft import get_peft_model

                model = get_peft_model(model, PeftLora(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LINEAR,
                                                       task_type="CAUSAL_LM"))
            if bf16_base:
                speed.freeze_to_bf16(model)
            if compile_blocks:
                speed.compile_blocks(model)
            net = torch.compile(model) if compile_model else model
            objective = (CausalLMObjective(net, fused=True, compile_chunks=self.device.type == "cuda")
                         if fused_loss else None)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95),
                                          fused=fused_adamw or None)
            data = _random_batches(s, 4, self.device)

            def run_steps(n: int) -> None:
                for i in range(n):
                    ids = data[i % len(data)]
                    with _autocast(self.device):
                        if objective:
                            loss = objective(ids, ids) / (ids.numel() - len(ids))
                        else:
                            loss = net(input_ids=ids, labels=ids).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            return run_steps, model
        return build

    def engine(self, shape: str, spec: EngineRun):
        """lmforge's own path: ``train_phase`` with the engine's GPU settings (``spec`` switches some off
        or on; ``pageable``: host-to-GPU copies from ordinary memory, as before the loop pinned them)."""
        method, pageable = spec.method, spec.settings.pageable

        def build():
            s = self.shapes[shape]
            cfg = s["model"].model_copy(update={"vocab_multiple": spec.vocab_multiple})
            settings = spec.training_fields()
            sharded = settings.get("parallel", {}).get("strategy") in ("fsdp", "deepspeed")
            if sharded:
                _one_rank_group(self.device)  # what a Ray Train worker has: FSDP2 or ZeRO over its process group
            training = TrainingConfig.model_validate({
                "method": method, "placement": {"use_gpu": self.device.type == "cuda", "use_ray": sharded},
                "logging": {"every": 10**6}, "optimizer": {"weight_decay": 0.01},
                "lora": LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=LINEAR), **settings})
            torch.manual_seed(0)  # the same initial weights in every row: loss_last is comparable
            with self.device:
                model = build_model(cfg, s["vocab"])
            if method == "qlora":  # reloads the saved base in 4-bit NF4, as the engine does
                import tempfile

                base_dir = Path(tempfile.mkdtemp())
                model.save_pretrained(base_dir)
                model = apply_method(model, training, base_dir, self.device)
            speed.apply_settings(model, training.speed, self.device)  # the engine's own steps (lmforge.train.worker)
            if method not in ("pretrain", "full", "qlora"):
                model = apply_method(model, training)
                if self.device.type == "cuda":
                    speed.freeze_to_bf16(model)
            rows = _random_rows(s, 64)
            batches = batch_stream(rows, s["batch"], seed=0)
            name = "pretrain" if method == "pretrain" else "finetune"

            def run_steps(n: int) -> float:
                phase = PhaseConfig(steps=n, learning_rate=1e-4, batch_size=s["batch"], seq_len=s["seq"],
                                    warmup_steps=0)
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
                    logged = training.model_copy(update={"logging": LoggingConfig(every=warmup)})
                    _, metrics = train_phase(model, name, cfg, logged, batches, [], self.device, on_log=on_log)
                finally:
                    loop.to_device = pinned
                return marks[warmup] - begin, marks[warmup + steps] - marks[warmup], metrics[f"{name}_loss"]

            run_steps.phase = phase
            return run_steps, model
        return build


def _one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (kept for the rest of the run: later rows see world size 1,
    which the loop treats as one process)."""
    import torch.distributed as dist

    from lmforge.stack.processes import free_port

    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else None)


def _random_batches(s: dict, n: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device) for _ in range(n)]


def _random_rows(s: dict, n: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, s["vocab"], (n, s["seq"]), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


