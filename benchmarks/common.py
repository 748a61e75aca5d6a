"""Shared benchmark plumbing: timing with spread, peak extra memory, environment record, JSON output.

Protocol (benchmarks/README.md): every variant runs in this one process on the same inputs; one
warm-up call each, then `repeats` rounds in which every variant is timed once, round-robin, so that
load drifting on a shared machine hits all variants alike; we report the median and the spread
(min, max, IQR) per variant.
Peak extra memory is the high-water mark during one call above the memory held before it:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats;
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs), with glibc
  told to return large blocks to the system at once (mallopt), so that memory freed by an earlier
  variant cannot hide a later variant's allocations.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _configure_glibc_malloc() -> None:
    """Fixed 128 KiB mmap threshold and trim threshold: large frees go straight back to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024)


_configure_glibc_malloc()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above what was held before, during one call of fn (its results are dropped after)."""
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before = _proc_status_bytes("VmRSS")
        _reset_peak_rss()
        out = fn()
        peak = _proc_status_bytes("VmHWM")
    del out
    return max(0, peak - before)


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    iqr_s: float
    samples_s: list[float]


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _summary(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(statistics.median(samples), min(samples), max(samples), q[2] - q[0], samples)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, Timing]:
    """Median and spread of each fn over `repeats` round-robin rounds, after one warm-up call each."""
    for fn in fns.values():
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
    return {name: _summary(s) for name, s in samples.items()}


def git_revision() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "git": git_revision(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        cpu = "unknown"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
        except (OSError, AttributeError):
            pass
        env["cpu"] = cpu
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        import oclear_ext

        env["oclear_ext_build"] = oclear_ext.build_info
    except ImportError:
        pass
    return env


def write_json(name: str, payload: dict, results_dir: str = RESULTS_DIR) -> str:
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return path


def save_figure(fig, path: str, title: str) -> None:
    """The figure with its title, laid out, to path (PNG), then closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(stem: str, payload: dict, draw: Callable[[str], None], results_dir: str = RESULTS_DIR) -> None:
    """results_dir/<stem>.json (the payload) and results_dir/<stem>.png (draw(path)), and says where."""
    json_path = write_json(stem + ".json", payload, results_dir)
    png_path = os.path.join(results_dir, stem + ".png")
    draw(png_path)
    print(f"wrote {json_path}\nwrote {png_path}")
