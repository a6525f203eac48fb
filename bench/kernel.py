"""Kernel benchmark: prefix attention forward, backward and fwd+bwd against the ways
people compute it today, same inputs, each checked against the reference first.

Methods:
  reasoncache-cuda     the fused op, CUDA C++ kernels (reasoncache._C; fp16/bf16, D 64/128)
  reasoncache-triton   the fused op, Triton kernels (CUDA only)
  reasoncache-torch    the fused op, PyTorch reference backend
  sdpa-concat-lower-right  prefix copied in front of every sequence, SDPA with
                       torch.nn.attention.bias.causal_lower_right
  sdpa-concat-mask     prefix copied in front of every sequence, SDPA with an explicit
                       boolean mask (what Hugging Face + PEFT prefix tuning runs)
  flash-attn-concat    flash_attn_func on the concatenation (bottom-right causal), when
                       flash-attn is installed
  hydragen-flex        the Hydragen split with FlexAttention: the prefix as one batch-1 KV
                       against every query of the batch, the own keys causal, merged by
                       log-sum-exp (compiled on CUDA; eager elsewhere)
  sdpa-flash, sdpa-cudnn  P = 0 only: plain causal SDPA pinned to its flash or cuDNN
                       backend, the FlashAttention-class anchor for the kernels' own speed

A method that disagrees with the reference, or fails, is recorded as failed and the run
goes on; with --out the JSON is rewritten after every shape.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import reasoncache

from .common import (
    bench_parser,
    environment,
    flops,
    markdown_table,
    parse_bench_args,
    peak_memory_mb,
    plot_lines,
    time_ms,
    write_json,
)


@dataclass(frozen=True)
class Shape:
    """One training-attention case: ``B`` sequences of ``N`` tokens, ``Hq``/``Hkv`` heads of dim ``D``,
    a shared prefix of ``P`` positions."""

    B: int
    Hq: int
    Hkv: int
    N: int
    P: int
    D: int
    dtype: str = "bf16"
    causal: bool = True


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The headline shapes, then a sequence-length sweep at the training shape.
FULL = [
    Shape(16, 32, 8, 2048, 256, 128),
    Shape(4, 32, 8, 4096, 256, 128),
    *[Shape(16 * 2048 // n, 32, 8, n, 256, 128) for n in (512, 1024, 8192)],
    Shape(16, 32, 8, 2048, 256, 64),
    Shape(16, 32, 32, 2048, 256, 128),  # MHA
    Shape(16, 32, 1, 2048, 256, 128),  # MQA
    Shape(16, 32, 8, 2048, 0, 128),  # plain causal attention
    Shape(16, 32, 8, 2048, 2048, 128),  # long prefix
]
QUICK_CPU = [Shape(2, 4, 2, 128, 16, 64, "fp32"), Shape(2, 4, 2, 256, 16, 64, "fp32")]
QUICK_CUDA = [Shape(4, 32, 8, 1024, 256, 128)]


class MethodUnavailable(RuntimeError):
    """A baseline that cannot run here (package missing, unsupported shape): skipped, not failed."""


def _sdpa_concat(q, k, v, pk, pv, causal, explicit_mask):
    """The baseline: copy the prefix in front of every sequence, then one SDPA call."""
    B, Hq, Nq, D = q.shape
    P = pk.shape[1]
    kc = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    vc = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    gqa = Hq != k.shape[1]
    if explicit_mask:
        Nk = kc.shape[2]
        mask = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask.tril(diagonal=Nk - Nq)
        mask[:, :P] = True
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask.expand(B, 1, Nq, Nk), enable_gqa=gqa)
    if causal:
        from torch.nn.attention.bias import causal_lower_right

        # lower-right over [prefix | own]: with Nq <= Nk every query sees the whole prefix.
        bias = causal_lower_right(Nq, kc.shape[2])
        if gqa:  # the causal-bias path has no enable_gqa; expand heads as HF does
            g = Hq // k.shape[1]
            kc, vc = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=bias)
    return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=gqa)


def _flash_attn_concat(q, k, v, pk, pv, causal):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise MethodUnavailable("flash-attn is not installed") from e
    B = q.shape[0]
    kc = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    vc = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    out = flash_attn_func(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), causal=causal)  # bottom-right
    return out.transpose(1, 2)


_flex_cache: dict = {}


def _hydragen_flex(q, k, v, pk, pv, causal):
    """Prefix part: one batch-1 KV (the shared prefix) against all B*Nq queries; own part:
    causal (bottom-right) FlexAttention; merge by log-sum-exp."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise MethodUnavailable("this torch has no FlexAttention") from e
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    flex = flex_attention
    if q.is_cuda:
        flex = _flex_cache.setdefault("compiled", torch.compile(flex_attention))
    o_p, l_p = flex(q.transpose(0, 1).reshape(1, Hq, B * Nq, D), pk[None], pv[None], enable_gqa=True, return_lse=True)
    o_p = o_p.reshape(Hq, B, Nq, D).transpose(0, 1)
    l_p = l_p.reshape(Hq, B, Nq).transpose(0, 1)
    block = None
    if causal:
        key = (Nq, Nk, q.device)
        if key not in _flex_cache:
            _flex_cache[key] = create_block_mask(
                lambda b, h, i, j: j <= i + (Nk - Nq), None, None, Nq, Nk, device=q.device
            )
        block = _flex_cache[key]
    o_o, l_o = flex(q, k, v, block_mask=block, enable_gqa=True, return_lse=True)
    lse = torch.logaddexp(l_p, l_o)
    return o_p * torch.exp(l_p - lse)[..., None].to(o_p.dtype) + o_o * torch.exp(l_o - lse)[..., None].to(o_o.dtype)


def _sdpa_pinned(name: str, backend: str):
    """Plain causal SDPA pinned to one of its backends: the anchor at P = 0."""

    def run(q, k, v, pk, pv, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if pk.shape[1]:
            raise MethodUnavailable(f"{name} is the P = 0 anchor (plain attention); this shape has a prefix")
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError as e:  # "No available kernel": this device, dtype or torch lacks it
            raise MethodUnavailable(f"{name}: SDPA's {backend} cannot run this here: {e}") from e

    return run


METHODS = {
    "reasoncache-cuda": lambda q, k, v, pk, pv, c: reasoncache.prefix_attention(
        q, k, v, pk, pv, causal=c, backend="cuda"
    ),
    "reasoncache-triton": lambda q, k, v, pk, pv, c: reasoncache.prefix_attention(
        q, k, v, pk, pv, causal=c, backend="triton"
    ),
    "reasoncache-torch": lambda q, k, v, pk, pv, c: reasoncache.prefix_attention(
        q, k, v, pk, pv, causal=c, backend="torch"
    ),
    "sdpa-concat-lower-right": lambda q, k, v, pk, pv, c: _sdpa_concat(q, k, v, pk, pv, c, explicit_mask=False),
    "sdpa-concat-mask": lambda q, k, v, pk, pv, c: _sdpa_concat(q, k, v, pk, pv, c, explicit_mask=True),
    "flash-attn-concat": _flash_attn_concat,
    "hydragen-flex": _hydragen_flex,
    "sdpa-flash": _sdpa_pinned("sdpa-flash", "FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa_pinned("sdpa-cudnn", "CUDNN_ATTENTION"),
}


def _inputs(s: Shape, device: str):
    dt = DTYPES[s.dtype]
    g = torch.Generator(device=device).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_()

    return [
        leaf(s.B, s.Hq, s.N, s.D),
        leaf(s.B, s.Hkv, s.N, s.D),
        leaf(s.B, s.Hkv, s.N, s.D),
        leaf(s.Hkv, s.P, s.D),
        leaf(s.Hkv, s.P, s.D),
    ]


def _check(name, fn, tensors, s: Shape) -> float:
    """Max error of ``fn``'s output against the fp32 reference on the first two sequences."""
    sub = [t[:2] for t in tensors[:3]] + tensors[3:]
    with torch.no_grad():
        got = fn(*sub, s.causal).float()
        want, _ = reasoncache.prefix_attention_ref(*sub, causal=s.causal)
    err = (got - want).abs().max().item()
    tol = 1e-3 if s.dtype == "fp32" else 3e-2
    if not err <= tol:
        raise AssertionError(f"{name} disagrees with the reference on {s}: max error {err:.3g} > {tol}")
    return err


def _time_method(fn, tensors, dout, s: Shape, device: str) -> dict:
    """fwd, bwd (from a retained graph) and fwd+bwd medians, TFLOP/s and fwd+bwd peak memory."""

    def fwd():
        with torch.no_grad():
            return fn(*tensors, s.causal)

    out = fn(*tensors, s.causal)

    def bwd():
        return torch.autograd.grad(out, tensors, dout, retain_graph=True, allow_unused=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(*tensors, s.causal), tensors, dout, allow_unused=True)  # P = 0: prefix unused

    row = {}
    for mode, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        ms = time_ms(f, device)
        row[f"{mode}_ms"] = ms
        row[f"{mode}_tflops"] = flops(s.B, s.Hq, s.N, s.N, s.P, s.D, s.causal, mode) / (ms * 1e-3) / 1e12
    row["fwd+bwd_peak_mb"] = peak_memory_mb(fwd_bwd, device)
    return row


def run_shape(s: Shape, device: str, methods: list[str]) -> list[dict]:
    """Time forward and forward+backward of every method in ``methods`` on shape ``s`` (inputs
    ``[B, Hq, N, D]``, prefix ``[Hkv, P, D]``) after checking each against the reference; one row per method."""
    tensors = _inputs(s, device)
    dout = torch.randn(s.B, s.Hq, s.N, s.D, device=device, dtype=DTYPES[s.dtype])
    rows = []
    for name in methods:
        row = {**asdict(s), "method": name}
        try:
            row["max_err"] = _check(name, METHODS[name], tensors, s)
            row.update(_time_method(METHODS[name], tensors, dout, s, device))
        except (reasoncache.BackendUnavailable, MethodUnavailable, NotImplementedError) as e:  # cannot run here
            row["skipped"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        except Exception as e:  # noqa: BLE001 - a wrong or crashing method is a result, not the end of the run
            row["failed"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rows.append(row)
    base = {r["method"]: r.get("fwd+bwd_ms") for r in rows}
    for r in rows:
        for ref in ("sdpa-concat-lower-right", "sdpa-concat-mask"):
            if r.get("fwd+bwd_ms") and base.get(ref):
                r[f"speedup_vs_{ref}"] = base[ref] / r["fwd+bwd_ms"]
    return rows


COLUMNS = [
    ("B", "B"),
    ("Hq/Hkv", "heads"),
    ("N", "N"),
    ("P", "P"),
    ("D", "D"),
    ("dtype", "dtype"),
    ("method", "method"),
    ("fwd ms", "fwd_ms"),
    ("fwd TFLOP/s", "fwd_tflops"),
    ("bwd ms", "bwd_ms"),
    ("bwd TFLOP/s", "bwd_tflops"),
    ("fwd+bwd ms", "fwd+bwd_ms"),
    ("x lower-right", "speedup_vs_sdpa-concat-lower-right"),
    ("x mask", "speedup_vs_sdpa-concat-mask"),
    ("peak MiB", "fwd+bwd_peak_mb"),
    ("max err", "max_err"),
]


def main(argv: list[str] | None = None, prog: str = "python -m bench kernel") -> list[dict]:
    ap = bench_parser(prog, __doc__)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = parse_bench_args(ap, argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    shapes = (QUICK_CUDA if args.device == "cuda" else QUICK_CPU) if args.quick else FULL
    env = environment(args.device)
    rows = []
    for s in shapes:
        rows += run_shape(s, args.device, methods)
        if args.out:  # after every shape: a run cut short keeps what it measured
            write_json(args.out, env, rows)
    for r in rows:
        r["heads"] = f"{r['Hq']}/{r['Hkv']}"
    print(
        f"# prefix attention kernels on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"commit {(env['git_commit'] or '?')[:9]})\n"
    )
    print(markdown_table([r for r in rows if "skipped" not in r and "failed" not in r], COLUMNS))
    for r in rows:
        for what in ("failed", "skipped"):
            if what in r:
                print(f"{what} {r['method']} at B={r['B']} N={r['N']} P={r['P']} D={r['D']}: {r[what]}")
    if args.out:
        write_json(args.out, env, rows)
        png = str(Path(args.out).with_suffix("")) + "_tflops_vs_n.png"
        sweep = [
            r
            for r in rows
            if r.get("fwd+bwd_tflops") and (r["P"], r["D"], r["Hkv"]) == (rows[0]["P"], rows[0]["D"], rows[0]["Hkv"])
        ]
        plot_lines(
            sweep, "N", "fwd+bwd_tflops", "method", png, f"fwd+bwd, {env['device']}", "sequence length N", "TFLOP/s"
        )
        print(f"\nwrote {args.out} and {png}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
