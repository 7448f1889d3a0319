"""What every benchmark in bench/ shares: the header facts (device, versions, date, threads),
peak-memory measurement (timing is ``bench/timing.py``), progress bars, plots' backend and markdown/CSV writing.

The report's sections (``bench/report/``: ``accuracy.py``, ``kernel_estimation.py``, ``speed.py``,
``weight_cost.py``, ``train.py``, ``fitting.py``, ``varlen.py``, ``window.py``), the trainer (``bench/tasks/``)
and the standalone scripts (``bench/perf/``: ``gpu.py``, ``cpu.py``, ``distributed.py``) import this module;
``bench/report/__main__.py`` only assembles the sections.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import math
import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field

import torch

import spectraformer_fused as sf

# time_fn and time_interleaved stay importable from here too: perf/hybrid_cpu.py times through common.
from .timing import measure, sync, time_fn, time_interleaved  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ----------------------------------------------------------------------------------------------------
# Environment: device, versions, threads, header line
# ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return name


def machine() -> str:
    """The CPU model and its logical core count, for CPU-only tables."""
    return f"{cpu_model()}, {os.cpu_count()} logical cores"


def command_line(module: str, argv: list[str] | None = None) -> str:
    """How this run was started, for a results file's header: ``python -m <module>`` and its arguments."""
    return " ".join([f"python -m {module}", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def versions() -> dict:
    out = {"torch": torch.__version__, "spectraformer_fused": sf.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = "absent"
    return out


def source_commit() -> str:
    """The checkout's commit (short hash, "+ uncommitted changes" when the package or bench/ differ from it),
    or "not a git checkout": the code a result file was measured with."""
    import subprocess

    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "spectraformer_fused", "csrc", "bench/report", "bench/common.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return head + (" + uncommitted changes" if dirty else "")


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def pick_threads(default: int) -> int:
    """The thread count for the next section: ``default`` unless OpenMP with ``default`` threads is slower
    than one thread right now (other processes busy on the same cores make its barriers stall)."""
    if default <= 1:
        return torch.get_num_threads()
    a = torch.randn(256, 256)

    def best(n):
        torch.set_num_threads(n)
        a @ a
        return min(measure({"10 mm": lambda: [a @ a for _ in range(10)]}, warmup=0, rounds=3)["10 mm"])

    n = default if best(default) <= best(1) else 1
    torch.set_num_threads(n)
    return n


@dataclass
class Context:
    """The facts every table header names: device, date, versions, mode, threads per section."""

    device: str
    date: str
    versions: dict
    mode: str
    load: list = field(default_factory=list)
    threads: dict = field(default_factory=dict)
    default_threads: int = 1

    def line(self, dtype: str, section: str | None = None) -> str:
        v = self.versions
        n = self.threads.get(section)
        threads = "" if n is None else f" | {n} of {self.default_threads} threads"
        return (
            f"device: {self.device}{threads} | dtype: {dtype} | torch {v['torch']}, triton {v['triton']}, "
            f"spectraformer_fused {v['spectraformer_fused']} | {self.date} | mode: {self.mode}"
        )

    def use_threads(self, section: str, device: torch.device) -> None:
        if device.type == "cpu":
            self.threads[section] = pick_threads(self.default_threads)

    def fields(self, dtype: str) -> dict:
        return {
            "device": self.device,
            "dtype": dtype,
            "torch": self.versions["torch"],
            "triton": self.versions["triton"],
            "spectraformer_fused": self.versions["spectraformer_fused"],
            "date": self.date,
            "threads": torch.get_num_threads(),
        }


class Bar:
    """tqdm when installed, else a silent stand-in."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0,
            )
        except ImportError:
            self._bar = None

    def update(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def gaussian_qkv(shape, s: float, seed: int, device, dtype=torch.float32):
    """q, k ~ N(0, s^2), v ~ N(0, 1) of shape ``[B, T, H, D]``, drawn on the CPU from ``seed``."""
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype) * s
    k = torch.randn(B, T, H, D, generator=gen, dtype=dtype) * s
    v = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    return q.to(device), k.to(device), v.to(device)


# ----------------------------------------------------------------------------------------------------
# Memory (timing: bench/timing.py)
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_fds():
    """Silence what the profiler's C++ side writes to stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


# How peak_memory measures, for table headers.
PEAK_MEMORY_HOW = {
    "cuda": "`torch.cuda.max_memory_allocated`",
    "cpu": "torch.profiler allocation events replayed in time order; approximate",
}


def peak_memory(fn, device) -> float | None:
    """Peak bytes allocated during one call beyond what was allocated before it.

    GPU: torch.cuda.max_memory_allocated. CPU: torch.profiler's allocation events replayed in time order
    (allocations at their op's start, frees at its end); None when the profiler gives nothing."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with quiet_fds():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    points = []
    for e in prof.events():
        b = e.self_cpu_memory_usage
        if b > 0:
            points.append((e.time_range.start, b))
        elif b < 0:
            points.append((e.time_range.end, b))
    if not points:
        return None
    points.sort()
    cur = best = 0
    for _, b in points:
        cur += b
        best = max(best, cur)
    return float(best)


# ----------------------------------------------------------------------------------------------------
# Output: plots, markdown, CSV
# ----------------------------------------------------------------------------------------------------


def get_plt():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def fmt(x, spec=".3g"):
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return format(x, spec)


def mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def md_table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def write_csv(path, rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def default_out_dir(device: torch.device) -> str:
    """``bench/results/<device>-<date>``: ``cpu`` or the GPU's name."""
    prefix = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    return os.path.join(RESULTS, f"{prefix}-{datetime.date.today().isoformat()}")
