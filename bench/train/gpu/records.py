"""The figures of ``bench.train.gpu``: each engine row against its same-run baseline, as records.

Called by ``python -m bench.train.gpu`` once its variants have run; ``bench.rows`` maps variant names
(``gpt2/plain``, ``llama_lora/lmforge[fa4]``, ...) to their measured rows. Each pair below becomes one
line of OUT/train_gpu.jsonl through ``bench.common.record``.
"""

from __future__ import annotations

import torch

from bench.common.record import command_line, record
from bench.train.gpu.runner import Bench
from bench.train.gpu.variants import ABLATIONS
from lmforge.config.training import PhaseConfig, PlacementConfig, TrainingConfig
from lmforge.model.info import describe

BENCH = "train_gpu"
CPU = PlacementConfig(use_gpu=False)  # memory estimates assume no GPU placement
# DeepSpeed's rows of llama_zero3 / llama_zero2 (metric word, row settings), each against the uncompiled loop.
ZERO_ROWS = (("zero3", "deepspeed"), ("zero3_offload_optimizer", "deepspeed,offload"), ("zero2", "deepspeed,stage2"))


def write_records(bench: Bench, device: str | None = None) -> None:
    """Ours against each same-run baseline, through ``bench.common.record``'s one format."""
    rows, out = bench.rows, bench.out
    command = command_line("PYTHONPATH=src python")  # one command for every record of the run
    estimate = {shape: describe(s["model"], TrainingConfig(method="full", placement=CPU, finetune=PhaseConfig(
        steps=1, learning_rate=1e-4, batch_size=s["batch"], seq_len=s["seq"])), s["vocab"])
        for shape, s in bench.shapes.items()}
    pairs = [("gpt2_124m_pretrain_tokens_per_s", "gpt2/lmforge", "gpt2/plain"),
             ("gpt2_124m_pretrain_tokens_per_s_vs_compile", "gpt2/lmforge", "gpt2/plain+torch.compile"),
             ("llama_1.1b_full_ft_tokens_per_s", "llama_full/lmforge", "llama_full/plain"),
             ("llama_1.1b_lora_r16_tokens_per_s", "llama_lora/lmforge", "llama_lora/peft")]
    pairs += [("gpt2_124m_model_scope_cudnn_tokens_per_s", "gpt2/lmforge[model,cudnn]", "gpt2/plain"),
              ("gpt2_124m_model_scope_cudnn_tokens_per_s_vs_compile", "gpt2/lmforge[model,cudnn]",
               "gpt2/plain+torch.compile"),
              ("gpt2_124m_model_scope_tokens_per_s_vs_compile", "gpt2/lmforge[model]", "gpt2/plain+torch.compile"),
              ("gpt2_124m_model_scope_fa4_tokens_per_s_vs_compile", "gpt2/lmforge[model,fa4]",
               "gpt2/plain+torch.compile"),
              ("gpt2_124m_model_scope_fa4_tokens_per_s", "gpt2/lmforge[model,fa4]", "gpt2/plain"),
              ("llama_1.1b_full_ft_fa4_tokens_per_s", "llama_full/lmforge[fa4]", "llama_full/plain"),
              ("llama_1.1b_full_ft_fa4_fp8_tokens_per_s", "llama_full/lmforge[fa4,fp8]", "llama_full/plain"),
              ("gpt2_124m_fa4_graphs_tokens_per_s_vs_compile", "gpt2/lmforge[model,fa4,graphs]",
               "gpt2/plain+torch.compile"),
              ("gpt2_124m_fa4_graphs_tokens_per_s", "gpt2/lmforge[model,fa4,graphs]", "gpt2/plain"),
              ("llama_1.1b_lora_r16_fa4_tokens_per_s", "llama_lora/lmforge[fa4]", "llama_lora/peft"),
              ("gpt2_124m_fa4_graphs_bf16res_tokens_per_s_vs_compile", "gpt2/lmforge[model,fa4,graphs,bf16res]",
               "gpt2/plain+torch.compile"),
              ("gpt2_124m_fa4_graphs_bf16res_tokens_per_s", "gpt2/lmforge[model,fa4,graphs,bf16res]", "gpt2/plain"),
              ("gpt2_124m_cudnn_graphs_bf16res_tokens_per_s_vs_compile", "gpt2/lmforge[model,cudnn,graphs,bf16res]",
               "gpt2/plain+torch.compile"),
              ("gpt2_124m_fa4_graphs_bf16res_opt_tokens_per_s_vs_compile",
               "gpt2/lmforge[model,fa4,graphs,bf16res,opt]", "gpt2/plain+torch.compile"),
              ("gpt2_124m_fa4_graphs_bf16res_opt_tokens_per_s", "gpt2/lmforge[model,fa4,graphs,bf16res,opt]",
               "gpt2/plain"),
              ("gpt2_124m_fa4_graphs_bf16res_pinned_vs_pageable_tokens_per_s",
               "gpt2/lmforge[model,fa4,graphs,bf16res]", "gpt2/lmforge[model,fa4,graphs,bf16res+pageable]"),
              ("gpt2_124m_fa4_graphs_bf16res_opt_pinned_vs_pageable_tokens_per_s",
               "gpt2/lmforge[model,fa4,graphs,bf16res,opt]", "gpt2/lmforge[model,fa4,graphs,bf16res,opt+pageable]"),
              ("gpt2_124m_cudnn_graphs_bf16res_opt_tokens_per_s_vs_compile",
               "gpt2/lmforge[model,cudnn,graphs,bf16res,opt]", "gpt2/plain+torch.compile"),
              ("gpt2_124m_liger_cudnn_tokens_per_s_vs_compile", "gpt2/lmforge[liger,cudnn]",
               "gpt2/plain+torch.compile"),
              ("llama_1.1b_full_ft_cudnn_tokens_per_s", "llama_full/lmforge[cudnn]", "llama_full/plain"),
              ("llama_1.1b_lora_r16_cudnn_tokens_per_s", "llama_lora/lmforge[cudnn]", "llama_lora/peft"),
              ("llama_1.1b_qlora_r16_compiled_tokens_per_s", "llama_qlora/lmforge[blocks]", "llama_lora/peft")]
    pairs += [(f"gpt2_124m_{flag}_alone_tokens_per_s", f"gpt2/plain+{flag}", "gpt2/plain") for flag in ABLATIONS]
    pairs += [("llama_1.1b_lora_bf16_base_alone_tokens_per_s", "llama_lora/peft+bf16_base", "llama_lora/peft"),
              ("llama_1.1b_full_fused_loss_alone_tokens_per_s", "llama_full/plain+fused_loss", "llama_full/plain"),
              ("llama_1.1b_full_ft_fsdp_one_gpu_tokens_per_s", "llama_full/lmforge[fsdp]", "llama_full/lmforge")]
    pairs += [(f"llama_1.1b_full_ft_{what}_one_gpu_tokens_per_s", f"llama_full/lmforge-compile[{row}]",
               "llama_full/lmforge-compile") for what, row in ZERO_ROWS]
    device = device or (torch.cuda.get_device_name(0) if bench.device.type == "cuda" else "cpu (--tiny check)")
    for metric, ours, base in pairs:
        if "tokens_per_s" in rows.get(ours, {}) and "tokens_per_s" in rows.get(base, {}):
            o, b = rows[ours], rows[base]
            record(BENCH, metric, o["tokens_per_s"], "tokens/s", f"{base} (MFU {b['mfu']:.1%})", b["tokens_per_s"],
                   device=device, command=f"{command}  # {ours}: MFU {o['mfu']:.1%}, peak {o.get('peak_gib')} GiB",
                   out_dir=out)
    for metric, without in (("gpt2_124m_engine_without_fused_loss_tokens_per_s", "gpt2/lmforge-fused_loss"),
                            ("gpt2_124m_engine_without_vocab64_tokens_per_s", "gpt2/lmforge-vocab64")):
        if "tokens_per_s" in rows.get(without, {}) and "tokens_per_s" in rows.get("gpt2/lmforge", {}):
            record(BENCH, metric, rows[without]["tokens_per_s"], "tokens/s", "gpt2/lmforge (all on)",
                   rows["gpt2/lmforge"]["tokens_per_s"], device=device, command=command, out_dir=out)
    for metric, ours, base in [("llama_1.1b_lora_peak_gib_vs_peft", "llama_lora/lmforge", "llama_lora/peft"),
                               ("llama_1.1b_lora_peak_gib_vs_full_ft", "llama_lora/lmforge", "llama_full/lmforge"),
                               ("llama_1.1b_qlora_checkpointing_peak_gib_vs_lora", "llama_qlora/lmforge+checkpointing",
                                "llama_lora/lmforge"),
                               ("llama_1.1b_full_checkpointing_peak_gib", "llama_full/lmforge+checkpointing",
                                "llama_full/lmforge"),
                               ("llama_1.1b_full_ft_fsdp_one_gpu_peak_gib", "llama_full/lmforge[fsdp]",
                                "llama_full/lmforge")] + [
            (f"llama_1.1b_full_ft_{what}_one_gpu_peak_gib", f"llama_full/lmforge-compile[{row}]",
             "llama_full/lmforge-compile") for what, row in ZERO_ROWS]:
        if "peak_gib" in rows.get(ours, {}) and "peak_gib" in rows.get(base, {}):
            record(BENCH, metric, rows[ours]["peak_gib"], "GiB", base, rows[base]["peak_gib"], device=device,
                   command=command, higher_is_better=False, out_dir=out)
    for name in ("gpt2/lmforge", "llama_full/lmforge"):
        if "tokens_per_s" in rows.get(name, {}):
            shape = rows[name]["shape"]
            est = next(m for m in estimate[shape].memory if m.phase == "finetune")
            record(BENCH, f"{shape}_memory_estimate_gib", round(est.total / 2**30, 2), "GiB",
                   f"measured peak of {name}", rows[name].get("peak_gib"), device=device,
                   command="lmforge model info (estimate) vs " + command, higher_is_better=False, out_dir=out)
    print("\nvariant                         tokens/s     MFU   peak GiB  warm-up s")
    for name, row in rows.items():
        print(f"{name:<30} {row.get('tokens_per_s', row.get('error', '-'))!s:>9} {row.get('mfu', 0):>7.1%} "
              f"{row.get('peak_gib', '-')!s:>9} {row.get('warmup_s', '-')!s:>9}")
