"""
What the benchmarks share: CUDA-event timing, the profiler's per-kernel times, markdown tables.
"""
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def events_ms(fn, reps=7, n=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def kernels(fn, n=10):
    """Each kernel fn launches, per call: (name, microseconds, launches), costliest first (profiler,
    over n calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    launched = [(e.key, e.self_device_time_total / n, e.count // n)
                for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    return sorted(launched, key=lambda k: -k[1])


def kernel_ms(launched):
    """kernels()' summed GPU time in ms, and how many kernels."""
    return sum(us for _, us, _ in launched) / 1e3, sum(count for _, _, count in launched)


def markdown_table(header, rows):
    """-> the lines of a markdown table (the bench scripts' output format)."""
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header), *('| ' + ' | '.join(row) + ' |' for row in rows)]
