"""Shared benchmark plumbing: FLOP counts, timing, environment record, JSON and tables."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def attention_pairs(B: int, Hq: int, Nq: int, Nk: int, P: int, causal: bool) -> int:
    """Query-key pairs actually computed: every query with every prefix key, plus the own
    keys it may see (bottom-right causal counted exactly, not halved)."""
    if causal:
        own = sum(max(0, min(Nk, i + Nk - Nq + 1)) for i in range(Nq))
    else:
        own = Nq * Nk
    return B * Hq * (Nq * P + own)


def flops(B: int, Hq: int, Nq: int, Nk: int, P: int, D: int, causal: bool, mode: str) -> float:
    """FLOPs by the flash-attention convention: 4*D per pair forward (QK^T and PV), the
    backward counted as 2.5x the forward, fwd+bwd as 3.5x."""
    fwd = 4.0 * D * attention_pairs(B, Hq, Nq, Nk, P, causal)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def time_ms(fn: Callable[[], object], device: str, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` after warm-up: triton.testing.do_bench on CUDA,
    a wall-clock median on the CPU."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated while running ``fn`` once (None on the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment(device: str) -> dict:
    """Device name, library versions and git commit: what a result must carry."""

    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        )
    except Exception:
        commit, dirty = None, None
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "device_type": device,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str | Path, env: dict, rows: list[dict]) -> None:
    """Write ``{environment, rows}`` to ``path`` (parents created): the results format every suite commits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Render ``rows`` with ``columns`` = [(header, key)]; floats get 3 significant digits."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_lines(
    rows: list[dict],
    x: str,
    y: str,
    group: str,
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
) -> None:
    """One line per ``group`` value: ``y`` against ``x`` (rows lacking either are left out).
    Without matplotlib (the ``[demo]`` extra) it says so in one line and draws nothing."""
    try:
        import matplotlib
    except ImportError:
        print(f"skipped the plot {path}: matplotlib draws it (pip install 'reasoncache[demo]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in dict.fromkeys(r[group] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[group] == name and r.get(y) is not None and r.get(x) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=str(name))
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every suite takes: --quick, --device, --out."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test of the harness, not of speed")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the JSON results (device, versions, commit, every row) and plots here")
    return ap


def check_counts(ap: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """A usage error naming the flag for each of ``names`` (argparse dests) given below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def parse_bench_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` with ``ap``; ``--device cuda`` without a CUDA device is a usage error, not a crash later."""
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args
