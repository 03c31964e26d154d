"""Comparisons of ``bench.serve.gpu_check``: engine outputs against references, with tolerances and why."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.serve.gpu_check.models import Out, model_forced

# Why these numbers: float32 runs differ only in summation order (merged vs unmerged LoRA, peft's
# dense attention vs the paged one): ~1e-6 relative, so tokens must agree and logits within 1e-4.
# bf16 rounds every activation to 8 mantissa bits (~0.4% per op); through 4 layers two computation
# orders differ by ~0.5-1.5% of the logits' L2 norm, growing a little along the sequence: 3% at the
# first step, 5% at any later step. A real bug (wrong adapter, position, cache row or prefix) moves
# the logits by tens of percent: each adapter's own effect is recorded and must exceed 3x the
# first-step tolerance, or the check could not tell. Two kinds of comparison:
# - "forced": the reference model's forward over the prompt plus the ENGINE's tokens (teacher
#   forcing): logits at every step, and how often the reference's argmax is the engine's token.
#   Only near-ties flip under bf16 noise (a few % of steps on this tiny model): agreement >= 0.9.
# - "greedy" (engine vs engine, or vs the merged adapter served alone): both decode freely; after
#   the first differing token their histories differ, so logits are compared up to and including
#   that step, and the share of matching leading tokens has a low floor under bf16 (0.5: one
#   near-tie flip early in a 24-token sequence loses most of its tokens; a CPU fp8-cache run with 1%
#   logits error kept 0.65); the logits at the flip carry the check.
# Quantized engines: int8 weights vs the unquantized engine move the logits ~1.5% at the first step
# and up to ~8% later (CPU, float32). The fp8 KV cache is compared with the same engine on PyTorch
# ops (the CPU path) with the same fp8 cache, which isolates the Triton fp8 kernels; against the
# unquantized engine it moves the logits ~9% (measured on CPU: the prefix's keys are large, and e4m3
# keeps 3 mantissa bits), which is recorded as "vs_unquantized" with a sanity bound only.
TOLERANCES = {
    "float32": {"first": 1e-4, "any": 1e-3, "agreement": 0.99, "forced_agreement": 0.99},
    "bfloat16": {"first": 0.03, "any": 0.05, "agreement": 0.5, "forced_agreement": 0.9},
    "int8": {"first": 0.06, "any": 0.15, "agreement": 0.5},
    "fp8_kv": {"first": 0.05, "any": 0.08, "agreement": 0.5},
    "fp8_kv_vs_unquantized": {"first": 0.2, "any": 0.3, "agreement": 0.2},
}
EFFECT_FACTOR = 3.0
# The noise-floor criterion (CUDA): the engine's largest logits distance from the float32 reference,
# over every step of every request, must be within NOISE_FACTOR x the bf16 reference model's own
# largest distance + NOISE_ABS. The absolute term keeps a margin where the reference happens to be
# very close to exact (prompt tuning on an H100: 0.0107, the engine 0.022 failed a bare 2x by a hair;
# with the 0.01 it passes with room, while a real bug moves the logits by tens of percent).
NOISE_FACTOR = 2.0
NOISE_ABS = 0.01
# Two greedy paths (speculative vs plain) may part at a near-tie: the float32 reference's gap between
# their two tokens within TIE_FACTOR x the bf16 reference's largest absolute logit error (each path is
# off by about that much), at least TIE_ABS (float32 paths differ by ~1e-5).
TIE_FACTOR = 2.0
TIE_ABS = 1e-3


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def compare(test: list[Out], ref: list[Out], tol: dict) -> dict:
    """Token agreement and logits errors of ``test`` against ``ref``, request by request."""
    agree = total = 0
    first = worst = 0.0
    diverged = []
    for i, (t, r) in enumerate(zip(test, ref, strict=True)):
        common = 0
        while common < len(r.tokens) and t.tokens[common] == r.tokens[common]:
            common += 1
        agree, total = agree + common, total + len(r.tokens)
        if common < len(r.tokens):
            diverged.append({"request": i, "step": common})
        for step in range(min(common + 1, len(r.tokens))):  # same history up to the first divergence
            err = rel_l2(t.logits[step], r.logits[step])
            worst = max(worst, err)
            first = max(first, err) if step == 0 else first
    agreement = agree / total
    ok = first <= tol["first"] and worst <= tol["any"] and agreement >= tol["agreement"]
    return {"ok": ok, "token_agreement": round(agreement, 4), "tokens_compared": total,
            "identical": agree == total, "first_logits_rel_l2": float(f"{first:.3g}"),
            "max_logits_rel_l2": float(f"{worst:.3g}"), "diverged": diverged[:8], "tol": tol}


def compare_forced(served: list[Out], forced: list[Out], tol: dict) -> dict:
    """The engine's logits against the reference's on the engine's own tokens, at every step."""
    agree = total = 0
    first = worst = 0.0
    for s, r in zip(served, forced, strict=True):
        agree += sum(a == b for a, b in zip(s.tokens, r.tokens))
        total += len(s.tokens)
        errors = [rel_l2(a, b) for a, b in zip(s.logits, r.logits, strict=True)]
        first, worst = max(first, errors[0]), max(worst, *errors)
    agreement = agree / total
    ok = first <= tol["first"] and worst <= tol["any"] and agreement >= tol["forced_agreement"]
    return {"ok": ok, "argmax_agreement": round(agreement, 4), "tokens_compared": total,
            "first_logits_rel_l2": float(f"{first:.3g}"), "max_logits_rel_l2": float(f"{worst:.3g}")}


def effect(adapted: list[Out], base: list[Out], tol: dict) -> dict:
    """How far an adapter moves the first-step logits from the base: a check whose adapters barely
    change the model would pass whatever the engine did with them."""
    errors = [rel_l2(a.logits[0], b.logits[0]) for a, b in zip(adapted, base, strict=True)]
    mean = sum(errors) / len(errors)
    return {"adapter_effect_rel_l2": {"mean": float(f"{mean:.3g}"), "min": float(f"{min(errors):.3g}")},
            "effect_ok": mean >= EFFECT_FACTOR * tol["first"]}


def judged(result: dict) -> bool:
    """Pass/fail of one greedy+forced comparison. With a float32 noise floor (CUDA), the logits are
    judged against it (within twice the bf16 reference's own distance from float32) and the forced
    argmax agreement must hold; without one, by the fixed tolerances."""
    floor = result.get("noise_floor")
    if floor is None:
        return result["greedy"]["ok"] and result["forced"]["ok"]
    agreement = result["forced"]["argmax_agreement"]
    return floor["within_floor"] and agreement >= TOLERANCES["bfloat16"]["forced_agreement"]


def noise_floor(served: list[Out], ref_forced: list[Out], make_fp32: Callable[[], torch.nn.Module],
                prompts: list[list[int]]) -> dict:
    """Both the engine and the reference against the reference in float32 on the engine's tokens: in
    bf16 the reference itself is this far from exact, so the engine is judged against that floor."""
    return floor_verdict(served, ref_forced, model_forced(make_fp32(), prompts, served))


def floor_verdict(served: list[Out], ref_forced: list[Out], exact: list[Out]) -> dict:
    """The noise-floor criterion (``NOISE_FACTOR``, ``NOISE_ABS``) with ``exact`` the float32 reference's
    forced logits; also the reference's largest absolute logit error, the scale of a bf16 near-tie."""
    ours = compare_forced(served, exact, TOLERANCES["float32"])
    ref = compare_forced(ref_forced, exact, TOLERANCES["float32"])
    bound = NOISE_FACTOR * ref["max_logits_rel_l2"] + NOISE_ABS
    abs_noise = max(float((r - e).abs().max()) for o, x in zip(ref_forced, exact) for r, e in zip(o.logits, x.logits))
    return {"engine_vs_fp32_max": ours["max_logits_rel_l2"], "reference_vs_fp32_max": ref["max_logits_rel_l2"],
            "engine_vs_fp32_first": ours["first_logits_rel_l2"], "reference_vs_fp32_first": ref["first_logits_rel_l2"],
            "bound": float(f"{bound:.3g}"), "margin": float(f"{bound / max(ours['max_logits_rel_l2'], 1e-12):.3g}"),
            "reference_abs_noise": float(f"{abs_noise:.3g}"), "within_floor": ours["max_logits_rel_l2"] <= bound}


def same_unless_tied(test: list[Out], plain: list[Out], exact: list[Out], margin: float) -> dict:
    """Greedy ``test`` tokens against ``plain`` ones (two engine paths), request by request: equal, or
    first different at a step where the float32 reference (``exact``, forced on ``test``'s tokens, so on
    the history both share up to there) scores the two chosen tokens within ``margin`` of each other (a
    near-tie that numerical noise may flip). A gap wider than that is a real difference: failed."""
    ties, wrong = [], []
    for i, (t, p, x) in enumerate(zip(test, plain, exact, strict=True)):
        step = next((k for k, (a, b) in enumerate(zip(t.tokens, p.tokens)) if a != b), None)
        if step is None:
            continue
        gap = abs(float(x.logits[step][t.tokens[step]] - x.logits[step][p.tokens[step]]))
        (ties if gap <= margin else wrong).append({"request": i, "step": step, "fp32_gap": float(f"{gap:.3g}")})
    return {"ok": not wrong, "identical": len(test) - len(ties) - len(wrong), "near_ties": ties[:8],
            "real_differences": wrong[:8], "tie_margin": float(f"{margin:.3g}")}
