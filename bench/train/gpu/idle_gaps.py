"""Where a profiled device waits: the idle time between consecutive kernels (``python -m bench.train.gpu --profile``).

With CUDA graphs the host launches little, so the idle time left is either kernel boundaries
inside the graphs (many gaps of a few microseconds) or the host holding the device up (few,
long gaps): the kernels on either side of the longest gaps say where.
"""

from __future__ import annotations


def idle_gaps(prof, cuda: bool, steps: int, top: int = 15) -> str:
    """Where the device waits in the profiled steps: idle time between consecutive kernels, by size,
    and the largest gaps with the kernels on either side (what the host was doing in between)."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == kind)
    gaps, end, before = [], None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, before[:70], name[:70]))
        if end is None or stop > end:
            end, before = stop, name
    buckets = {"< 5 us": (0, 5), "5-50 us": (5, 50), "50-500 us": (50, 500), ">= 500 us": (500, float("inf"))}
    lines = [f"idle between kernels: {sum(g for g, _, _ in gaps) / 1000 / steps:.2f} ms per step in {len(gaps)} gaps"]
    for label, (low, high) in buckets.items():
        chosen = [g for g, _, _ in gaps if low <= g < high]
        lines.append(f"  {label:>9}: {len(chosen) / steps:7.1f} gaps per step, {sum(chosen) / 1000 / steps:.2f} ms")
    lines.append("largest gaps (us, kernel before, kernel after):")
    lines += [f"  {g:9.1f}  {a}  ->  {b}" for g, a, b in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)
