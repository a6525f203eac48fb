"""Decode benchmark: one new token per sequence against a shared prefix plus its own cache.

Methods (attention of one layer per decode step, same inputs, checked first):
  reasoncache-<backend>  the fused op: every sequence reads the one shared prefix (the
                         CUDA and Triton backends batch all sequences' queries against it,
                         Hydragen)
  triton-per-sequence    the Triton forward with that pass off: each (sequence, KV head)
                         program reads the prefix itself (what the pass saves)
  sdpa-copied-prefix     the prefix copied into every sequence's KV cache (what
                         PEFT prefix tuning and in-context prompts do), then SDPA;
                         the copy is made once, outside the timed step, as a real
                         cache would hold it
  <method>-graph         on CUDA, the same step captured once into a CUDA graph and
                         replayed (after two warm-up steps, so nothing autotunes during
                         capture): the step without Python's launch overhead, which
                         the eager rows include. Graph rows compare with the copied
                         prefix's graph row, eager rows with its eager row.

The second table is the paper's inference-cost axis: ReasonCACHE (a short learned
prefix, 64 positions, shared) against in-context learning (a long demonstration prompt
in every sequence's cache), at equal batch.

A method that disagrees with the reference, or fails, is recorded as failed and the run
goes on; with --out the JSON is rewritten after every shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import reasoncache

from .common import bench_parser, environment, markdown_table, parse_bench_args, plot_lines, time_ms, write_json


@dataclass(frozen=True)
class DecodeShape:
    """One decode case: ``B`` sequences of one new query each, a shared prefix of ``P`` positions, ``N``
    cached own tokens per sequence, ``Hq``/``Hkv`` heads of dim ``D``."""

    B: int
    P: int  # shared prefix positions
    N: int  # own cached tokens per sequence
    Hq: int = 32
    Hkv: int = 8
    D: int = 128
    dtype: str = "bf16"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = [
    DecodeShape(b, p, n)
    for b in (1, 8, 32, 128, 256)
    for p in (256, 2048, 8192)
    for n in (128, 512, 2048)
    if b * (p + n) <= 256 * 4096
]
QUICK_CPU = [DecodeShape(b, 256, 128, 8, 2, 64, "fp32") for b in (1, 8)]
QUICK_CUDA = [DecodeShape(128, 2048, 512)]


def _inputs(s: DecodeShape, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    dt = DTYPES[s.dtype]

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dt)

    return (
        r(s.B, s.Hq, 1, s.D),
        r(s.B, s.Hkv, s.N, s.D),
        r(s.B, s.Hkv, s.N, s.D),
        r(s.Hkv, s.P, s.D),
        r(s.Hkv, s.P, s.D),
    )


def _copied(q, k, v, pk, pv):
    """The baseline's cache: the prefix in front of every sequence's own keys."""
    B = q.shape[0]
    return torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2)


class _Graphed:
    """``fn`` captured into a CUDA graph on its first call (after two warm-up calls on a side
    stream, as torch.cuda.graph's documentation asks: autotuning and one-time allocations
    happen there, not in the capture); every call replays it and returns the captured output."""

    def __init__(self, fn):
        self.fn, self.graph, self.out = fn, None, None

    def __call__(self):
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        return self.out


def run_shape(s: DecodeShape, device: str, backends: list[str]) -> list[dict]:
    """Time every backend in ``backends`` on shape ``s`` after checking its output against the
    reference (a wrong one fails); ``[B, Hq, 1, D]`` queries, one row per method, with the KV
    cache's size as each method holds it."""
    q, k, v, pk, pv = _inputs(s, device)
    kc, vc = _copied(q, k, v, pk, pv)
    gqa = s.Hq != s.Hkv
    want, _ = reasoncache.prefix_attention_ref(q, k, v, pk, pv)
    tol = 1e-3 if s.dtype == "fp32" else 3e-2
    bytes_el = torch.finfo(DTYPES[s.dtype]).bits // 8
    cache_mb = {
        "shared": 2 * s.Hkv * s.D * (s.B * s.N + s.P) * bytes_el / 2**20,
        "copied": 2 * s.Hkv * s.D * s.B * (s.N + s.P) * bytes_el / 2**20,
    }
    methods = {
        f"reasoncache-{b}": (lambda b=b: reasoncache.prefix_attention(q, k, v, pk, pv, backend=b), "shared")
        for b in backends
    }
    if "triton" in backends:

        def per_sequence():
            from reasoncache.kernels.fwd import prefix_attention_fwd

            return prefix_attention_fwd(q, k, v, pk, pv, None, True, s.D**-0.5, shared_prefix=False)[0]

        methods["triton-per-sequence"] = (per_sequence, "shared")
    methods["sdpa-copied-prefix"] = (lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa), "copied")
    if device == "cuda":
        methods |= {f"{name}-graph": (_Graphed(fn), kind) for name, (fn, kind) in methods.items()}
    rows = []
    for name, (fn, kind) in methods.items():
        row = {**asdict(s), "method": name, "kv_cache_mb": cache_mb[kind]}
        rows.append(row)
        try:
            with torch.no_grad():
                err = (fn().float() - want).abs().max().item()
                if not err <= tol:
                    raise AssertionError(f"{name} disagrees with the reference on {s}: max error {err:.3g} > {tol}")
                row["step_ms"] = time_ms(fn, device)
        except reasoncache.BackendUnavailable as e:
            row["skipped"] = str(e).splitlines()[0][:200]
            continue
        except Exception as e:  # noqa: BLE001 - a wrong or crashing method is a result, not the end of the run
            row["failed"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            continue
        row["max_err"] = err
        row["tokens_per_s"] = s.B / (row["step_ms"] * 1e-3)
    base = {r["method"]: r["step_ms"] for r in rows if r["method"].startswith("sdpa-copied-prefix") and "step_ms" in r}
    for r in rows:
        copied = base.get("sdpa-copied-prefix-graph" if r["method"].endswith("-graph") else "sdpa-copied-prefix")
        if "step_ms" in r and copied:
            r["speedup_vs_copied"] = copied / r["step_ms"]
    return rows


def _step_ms(s: DecodeShape, device: str, backend: str | None) -> float:
    """One decode step's attention: the fused op (``backend``) or SDPA over the copied prefix (None)."""
    q, k, v, pk, pv = _inputs(s, device)
    if backend is None:
        kc, vc = _copied(q, k, v, pk, pv)
        gqa = s.Hq != s.Hkv
        fn = lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa)
    else:
        fn = lambda: reasoncache.prefix_attention(q, k, v, pk, pv, backend=backend)
    with torch.no_grad():
        return time_ms(fn, device)


def icl_vs_reasoncache(device: str, backend: str, quick: bool) -> list[dict]:
    """Equal batch: ICL keeps a long demonstration prompt in every sequence's cache;
    ReasonCACHE keeps a short learned prefix once."""
    rows = []
    batches = (1, 8) if quick else (1, 16, 64, 256)
    icl_len, rc_len, own = (256, 16, 64) if quick else (2048, 64, 256)
    dims = dict(Hq=8, Hkv=2, D=64, dtype="fp32") if quick else {}
    for b in batches:
        t_icl = _step_ms(DecodeShape(b, icl_len, own, **dims), device, None)
        t_rc = _step_ms(DecodeShape(b, rc_len, own, **dims), device, backend)
        rows.append(
            {
                "B": b,
                "icl_prompt": icl_len,
                "reasoncache_prefix": rc_len,
                "own": own,
                "icl_ms": t_icl,
                "reasoncache_ms": t_rc,
                "speedup": t_icl / t_rc,
            }
        )
    return rows


COLUMNS = [
    ("B", "B"),
    ("P shared", "P"),
    ("own", "N"),
    ("method", "method"),
    ("step ms", "step_ms"),
    ("tokens/s", "tokens_per_s"),
    ("x copied", "speedup_vs_copied"),
    ("KV cache MiB", "kv_cache_mb"),
    ("max err", "max_err"),
]
ICL_COLUMNS = [
    ("B", "B"),
    ("ICL prompt", "icl_prompt"),
    ("ReasonCACHE P", "reasoncache_prefix"),
    ("own", "own"),
    ("ICL ms", "icl_ms"),
    ("ReasonCACHE ms", "reasoncache_ms"),
    ("speedup", "speedup"),
]


def main(argv: list[str] | None = None, prog: str = "python -m bench decode") -> list[dict]:
    ap = bench_parser(prog, __doc__)
    ap.add_argument("--backends", help="comma-separated reasoncache backends (default: cuda,triton,torch on CUDA)")
    args = parse_bench_args(ap, argv)
    default = "cuda,triton,torch" if args.device == "cuda" else "torch"
    backends = [b.strip() for b in (args.backends or default).split(",") if b.strip()]
    unknown = [b for b in backends if b not in reasoncache.ops.backends.NAMES]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; choose from {list(reasoncache.ops.backends.NAMES)}")
    shapes = (QUICK_CUDA if args.device == "cuda" else QUICK_CPU) if args.quick else FULL
    env = environment(args.device)
    rows = []
    for s in shapes:
        rows += run_shape(s, args.device, backends)
        if args.out:  # after every shape: a run cut short keeps what it measured
            write_json(args.out, env, rows)
    probe = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device=args.device)
    usable = [b for b in backends if not reasoncache.ops.backends._BACKENDS[b].not_supported_reasons(probe)]
    primary = usable[0] if usable else "torch"
    icl = icl_vs_reasoncache(args.device, primary, args.quick)
    print(f"# decode attention (one layer, one new token per sequence) on {env['device']}\n")
    print(markdown_table([r for r in rows if "skipped" not in r and "failed" not in r], COLUMNS))
    for r in rows:
        if "failed" in r:
            print(f"failed {r['method']} at B={r['B']} P={r['P']} own={r['N']}: {r['failed']}")
    print("\n# ReasonCACHE (short shared prefix) vs in-context learning (long prompt per sequence)\n")
    print(markdown_table(icl, ICL_COLUMNS))
    if args.out:
        write_json(args.out, env, rows + [{"table": "icl_vs_reasoncache", **r} for r in icl])
        png = str(Path(args.out).with_suffix("")) + "_speedup_vs_batch.png"
        fused = [
            {**r, "series": f"P={r['P']}, own={r['N']}"}
            for r in rows
            if r["method"].startswith("reasoncache-") and r["method"] == f"reasoncache-{primary}"
        ]
        plot_lines(
            fused,
            "B",
            "speedup_vs_copied",
            "series",
            png,
            f"decode: shared prefix vs copied, {env['device']}",
            "batch",
            "speedup over the copied prefix",
        )
        print(f"\nwrote {args.out} and {png}")
    return rows
