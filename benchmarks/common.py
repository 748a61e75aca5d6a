"""Shared benchmark plumbing: timing with spread, peak extra memory, allocator choice and record, JSON output.

Protocol (benchmarks/README.md): every variant runs in this one process on the same inputs, under the same
allocator settings; one warm-up call each, then `repeats` rounds in which every variant is timed once,
round-robin, so that load drifting on a shared machine hits all variants alike; we report the median and
the spread (min, max, IQR) per variant.

Allocator: this module changes no allocator setting. Which allocator a run uses (glibc's malloc as the
process has it, or jemalloc / tcmalloc through LD_PRELOAD, with whatever GLIBC_TUNABLES / MALLOC_CONF say)
is the run's choice, recorded by allocator_environment(); use_allocator() re-executes a benchmark under
jemalloc for its --allocator flag.

Peak extra memory is the high-water mark during one call above the memory held before it:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats;
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above VmRSS before the
  call, after release_free_memory() has handed the allocator's free pages back to the system (glibc's
  malloc_trim, jemalloc's arena purge, tcmalloc's ReleaseFreeMemory), so that memory freed by an earlier
  variant cannot hide a later variant's allocations, whatever the allocator. It counts everything the call
  makes resident (scratch buffers outside torch's allocator too); the memory an allocator or a cache keeps
  after the call is reported separately (`retained`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
# Settings that decide whether freed memory stays mapped (and so whether outputs page-fault afresh).
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_MMAP_MAX_", "MALLOC_ARENA_MAX", "TCMALLOC_RELEASE_RATE", "THP_MEM_ALLOC_ENABLE")
_REEXEC_MARK = "OCLEAR_BENCH_REEXECUTED"
_process = ctypes.CDLL(None)


def allocator() -> str:
    """The malloc this process runs: "jemalloc", "tcmalloc" or "glibc" (by the symbols that each exports)."""
    if hasattr(_process, "mallctl"):
        return "jemalloc"
    if hasattr(_process, "MallocExtension_ReleaseFreeMemory"):
        return "tcmalloc"
    return "glibc"


def release_free_memory() -> None:
    """Hands the allocator's free pages back to the system (resident memory then is what is in use)."""
    name = allocator()
    if name == "jemalloc":
        mallctl = _process.mallctl
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        mallctl(b"thread.tcache.flush", None, None, None, 0)
        mallctl(b"arena.4096.purge", None, None, None, 0)  # 4096 = MALLCTL_ARENAS_ALL
    elif name == "tcmalloc":
        _process.MallocExtension_ReleaseFreeMemory()
    elif hasattr(_process, "malloc_trim"):
        _process.malloc_trim(0)  # glibc: every arena, free pages inside the heap too (not only its top)


def _transparent_huge_pages() -> dict:
    out = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                out[name] = f.read().strip()
        except OSError:
            pass
    return out


def allocator_environment() -> dict:
    """What decides where this run's large blocks come from: the allocator, its settings, huge pages."""
    return {"allocator": allocator(), "libc": " ".join(platform.libc_ver()),
            "variables": {k: os.environ[k] for k in ALLOCATOR_VARIABLES if k in os.environ},
            "transparent_hugepage": _transparent_huge_pages()}


def use_allocator(name: str) -> None:
    """Makes this benchmark run under `name` ("glibc" or "jemalloc"), re-executing it with
    LD_PRELOAD=libjemalloc.so.2 if needed; other allocator settings in the environment pass through."""
    current = allocator()
    if name == current:
        return
    if name == "glibc":
        raise SystemExit(f"--allocator glibc: this process runs {current} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}); "
                         "run it without LD_PRELOAD")
    if name != "jemalloc":
        raise SystemExit(f"--allocator must be glibc or jemalloc, got {name!r}")
    if os.environ.get(_REEXEC_MARK):
        raise SystemExit(f"--allocator jemalloc: re-executed with LD_PRELOAD={os.environ.get('LD_PRELOAD')!r}, "
                         "but jemalloc is not this process's malloc")
    found = ctypes.util.find_library("jemalloc")
    path = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), found)
    if path is None:
        raise SystemExit("--allocator jemalloc: libjemalloc.so.2 not found; on Debian / Ubuntu: apt-get install -y libjemalloc2")
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [path, os.environ.get("LD_PRELOAD")])), **{_REEXEC_MARK: "1"})
    print(f"re-executing under jemalloc: LD_PRELOAD={env['LD_PRELOAD']}", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints): how busy the machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_of_call(fn: Callable[[], object], device: torch.device,
                   cleanup: Callable[[], None] | None = None) -> tuple[int, int]:
    """(peak extra, retained) bytes of one call of fn: the high-water mark during the call above what was
    held before it, and what is still held after its results are dropped (and cleanup() has run, e.g. to
    drop the gradients it left): memory an allocator or a cache keeps for reuse. CUDA: allocated bytes
    (the caching allocator's reserve is not counted). CPU: resident pages (see the module docstring)."""
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
        release_free_memory()
        before = _proc_status_bytes("VmRSS")
        _reset_peak_rss()
        out = fn()
        peak = _proc_status_bytes("VmHWM")
    del out
    if cleanup is not None:
        cleanup()
    gc.collect()
    synchronize(device)
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmRSS")
    return max(0, peak - before), max(0, after - before)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory above what was held before, during one call of fn (its results are dropped after)."""
    return memory_of_call(fn, device)[0]


@dataclass
class Staged:
    """A variant whose timed call needs untimed set-up before it and tear-down after it, every round (for
    state it must find but the other variants must not see, e.g. a warm cache)."""

    call: Callable[[], object]
    setup: Callable[[], None]
    teardown: Callable[[], None]

    def __call__(self) -> object:  # one untimed, self-contained call (warm-up, memory pass)
        self.setup()
        try:
            return self.call()
        finally:
            self.teardown()


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
    """Median and spread of each fn over `repeats` round-robin rounds, after one warm-up call each. A
    Staged variant has its set-up and tear-down run around each timed call, outside the timing."""
    for fn in fns.values():
        fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if isinstance(fn, Staged):
                fn.setup()
                synchronize(device)
                try:
                    samples[name].append(_time_once(fn.call, device))
                finally:
                    fn.teardown()
            else:
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
        env["allocator"] = allocator_environment()
    env["load_average_at_start"] = load_average()
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
