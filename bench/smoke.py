"""``python -m bench smoke``: the first look at a GPU, in one short process per backend.

In this order, each item appended to ``--out`` (JSON) as soon as it finishes, a failure
recorded and the next item run:

1. ``errors``: forward, lse and the five gradients against the fp64 oracle on small slices
   (bf16 and fp16; D=128 GQA with a prefix, D=64 with left padding and a window), and
   ``odd``: the same at the small odd shapes the sanitizers run (``ODD``);
2. ``decode-before-prefill``: B=128 sequences, shared P=2048, 512 own tokens, before any
   prefill has run;
3. ``headline``: the training shape (B=16, Hq=32, Hkv=8, N=2048, P=256, D=128, bf16)
   beside SDPA on the concatenated prefix (lower-right causal and explicit mask);
4. ``p0-causal``: P=0 beside SDPA pinned to its flash and cuDNN backends (the
   FlashAttention-class anchor on this machine);
5. ``decode-after-prefill``: the same decode again (the autotuner must not carry prefill
   tiles into decode);
6. ``d64-padding-window``: D=64 with key padding and a sliding window; 7. ``d256``;
8. ``tma-forward`` (Triton): the headline forward with K/V tiles by pointer and by TMA;
9. ``chosen-tiles``: the tile the autotuner chose for every kernel and size class, with
   registers and spills.

``--backend`` picks the kernels (triton or cuda; run them in separate processes, so a
fault in one cannot poison the other). ``--device cpu`` runs tiny shapes on the torch
backend: a check of this harness, not of any kernel.
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

import reasoncache

from . import decode, kernel
from .common import environment, time_ms, write_json


def _inputs(B, Hq, Hkv, N, P, D, dtype, device, pad=False, Nk=None):
    """q ``[B, Hq, N, D]``, k/v ``[B, Hkv, Nk or N, D]``, prefix ``[Hkv, P, D]``; with ``pad``
    the first sequence loses its first third of keys."""
    Nk = Nk or N
    g = torch.Generator(device=device).manual_seed(0)
    t = [torch.randn(*s, generator=g, device=device, dtype=dtype) for s in
         ((B, Hq, N, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (Hkv, P, D), (Hkv, P, D))]  # fmt: skip
    mask = None
    if pad:
        mask = torch.ones(B, Nk, dtype=torch.bool, device=device)
        mask[0, : Nk // 3] = False
    return t, mask


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# Small odd shapes for the sanitizers and a first error check (the GPU issue's list).
ODD = [
    dict(B=2, Hq=4, Hkv=2, N=70, P=17, D=64),
    dict(B=2, Hq=8, Hkv=2, N=40, Nk=100, P=70, D=128, pad=True),
    dict(B=2, Hq=4, Hkv=1, N=50, Nk=20, P=9, D=64),  # Nq > Nk: early rows see only the prefix
    dict(B=2, Hq=4, Hkv=2, N=90, P=0, D=64, window=33),
    dict(B=3, Hq=8, Hkv=2, N=1, Nk=300, P=40, D=128),  # decode
    dict(B=3, Hq=8, Hkv=2, N=16, Nk=700, P=100, D=128, pad=True),  # multi-token decode, split own cache
]


def errors(backend: str, device: str, quick: bool, cases: list[dict] | None = None) -> list[dict]:
    """Max abs error of out, lse and the 5 gradients against the fp64 reference."""
    N = 40 if quick else 300
    cases = cases or [
        dict(B=2, Hq=8, Hkv=2, N=N, P=17, D=128),
        dict(B=2, Hq=4, Hkv=2, N=N, P=5, D=64, pad=True, window=77),
    ]
    dtypes = (torch.float32,) if device == "cpu" else (torch.bfloat16, torch.float16)
    rows = []
    for c in cases:
        for dt in dtypes:
            window = c.get("window")
            (q, k, v, pk, pv), mask = _inputs(
                c["B"], c["Hq"], c["Hkv"], c["N"], c["P"], c["D"], dt, device, c.get("pad"), c.get("Nk")
            )
            leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
            out, lse = reasoncache.prefix_attention(
                *leaves, key_padding_mask=mask, sliding_window=window, return_lse=True, backend=backend
            )
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, dout)
            ref = [t.detach().double().requires_grad_() for t in leaves]
            r_out, r_lse = reasoncache.prefix_attention_ref(*ref, key_padding_mask=mask, sliding_window=window)
            r_grads = torch.autograd.grad(r_out, ref, dout.double())
            row = {k_: v_ for k_, v_ in c.items()} | {"dtype": str(dt).replace("torch.", "")}
            row["err_out"] = _max_err(out, r_out)
            finite = torch.isfinite(r_lse)
            row["err_lse"] = _max_err(lse[finite], r_lse[finite])
            for name, g, rg in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, r_grads):
                row[f"err_{name}"] = _max_err(g, rg)
            rows.append(row)
    return rows


def timed_padding_window(backend: str, device: str, quick: bool) -> list[dict]:
    """D=64 with left padding and a sliding window: ours, and SDPA with the explicit mask."""
    B, N, P = (2, 64, 8) if quick else (8, 2048, 256)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    (q, k, v, pk, pv), mask = _inputs(B, 16, 4, N, P, 64, dt, device, pad=True)
    window = N // 4

    def ours():
        return reasoncache.prefix_attention(
            q, k, v, pk, pv, key_padding_mask=mask, sliding_window=window, backend=backend
        )

    with torch.no_grad():
        want, _ = reasoncache.prefix_attention_ref(q, k, v, pk, pv, key_padding_mask=mask, sliding_window=window)
        err = (ours().float() - want.float()).abs().max().item()
        return [{"B": B, "N": N, "P": P, "D": 64, "window": window, "max_err": err, "fwd_ms": time_ms(ours, device)}]


def tma_forward(device: str) -> list[dict]:
    """The Triton forward at the headline shape (causal, bf16) with its interior K/V tiles
    loaded by pointer and through TMA descriptors (``REASONCACHE_TRITON_TMA=1``'s path, off
    by default until this item has measured it): the largest difference between the two
    outputs, then each one's time and TFLOP/s (4 B Hq N (P + (N + 1) / 2) D)."""
    from reasoncache.kernels.fwd import prefix_attention_fwd, tma_unusable

    B, Hq, Hkv, N, P, D = 16, 32, 8, 2048, 256, 128
    (q, k, v, pk, pv), _ = _inputs(B, Hq, Hkv, N, P, D, torch.bfloat16, device)
    reason = tma_unusable(k, v, pk, pv)
    if reason is not None:
        return [{"skipped": reason}]

    def run(tma: bool):
        return prefix_attention_fwd(q, k, v, pk, pv, None, True, D**-0.5, tma=tma)[0]

    with torch.no_grad():
        diff = _max_err(run(False), run(True))
        flops = 4 * B * Hq * N * (P + (N + 1) / 2) * D
        rows = []
        for tma in (False, True):
            ms = time_ms(lambda tma=tma: run(tma), device)
            rows.append({"tma": tma, "max_diff_vs_pointer_loads": diff, "fwd_ms": ms, "tflops": flops / ms / 1e9})
    return rows


def chosen_tiles() -> list[dict]:
    """What the Triton autotuner picked per kernel and key, and each compiled kernel's
    registers and spills (read where this Triton exposes them)."""
    from reasoncache.kernels import bwd, fwd

    rows = []
    for name, tuner in (("fwd", fwd._fwd_autotuned), ("dkdv", bwd._dkdv_autotuned), ("dq", bwd._dq_autotuned)):
        for key, cfg in getattr(tuner, "cache", {}).items():
            rows.append({"kernel": name, "key": [str(x) for x in key], "config": str(cfg)})
        try:  # the JIT cache is internal to Triton (read as 3.8 lays it out): keep the picks if it moved
            for dev, cache in getattr(tuner.fn, "device_caches", {}).items():
                for compiled in (cache[0] or {}).values():
                    meta = getattr(compiled, "metadata", None)
                    read = {"n_regs": compiled, "n_spills": compiled, "shared": meta, "num_warps": meta}
                    rows.append(
                        {"kernel": name, "device": str(dev)} | {k: getattr(o, k, None) for k, o in read.items()}
                    )
        except (TypeError, IndexError, AttributeError) as e:
            rows.append({"kernel": name, "registers": f"not readable from this Triton ({type(e).__name__}: {e})"})
    return rows


def main(argv: list[str] | None = None, prog: str = "python -m bench smoke") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--backend", default="triton", choices=["triton", "cuda", "torch"])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="smoke.json", help="JSON, rewritten after every item")
    ap.add_argument("--only", nargs="+", metavar="ITEM", help="run only these items (see the list below)")
    args = ap.parse_args(argv)
    quick = args.device == "cpu"
    if quick and args.backend != "torch":
        ap.error("--device cpu runs the torch backend only (a harness check); pass --backend torch")
    env = environment(args.device) | {"backend": args.backend}
    ours = f"reasoncache-{args.backend}"
    head = kernel.Shape(2, 4, 2, 64, 8, 64, "fp32") if quick else kernel.Shape(16, 32, 8, 2048, 256, 128)
    p0 = kernel.Shape(2, 4, 2, 64, 0, 64, "fp32") if quick else kernel.Shape(16, 32, 8, 2048, 0, 128)
    d256 = kernel.Shape(1, 4, 2, 32, 8, 256, "fp32") if quick else kernel.Shape(4, 32, 8, 2048, 256, 256)
    dec = decode.DecodeShape(4, 64, 16, 8, 2, 64, "fp32") if quick else decode.DecodeShape(128, 2048, 512)
    items = {
        "errors": lambda: errors(args.backend, args.device, quick),
        "odd": lambda: errors(args.backend, args.device, quick, ODD),
        "decode-before-prefill": lambda: decode.run_shape(dec, args.device, [args.backend]),
        "headline": lambda: kernel.run_shape(head, args.device, [ours, "sdpa-concat-lower-right", "sdpa-concat-mask"]),
        "p0-causal": lambda: kernel.run_shape(p0, args.device, [ours, "sdpa-flash", "sdpa-cudnn"]),
        "decode-after-prefill": lambda: decode.run_shape(dec, args.device, [args.backend]),
        "d64-padding-window": lambda: timed_padding_window(args.backend, args.device, quick),
        "d256": lambda: kernel.run_shape(d256, args.device, [ours, "sdpa-concat-lower-right"]),
        "tma-forward": (lambda: tma_forward(args.device)) if args.backend == "triton" and not quick else list,
        "chosen-tiles": chosen_tiles if args.backend == "triton" else list,
    }
    unknown = set(args.only or ()) - set(items)
    if unknown:
        ap.error(f"--only: unknown items {sorted(unknown)}; choose from {list(items)}")
    results = []
    for name, fn in items.items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        try:
            rows, status = fn(), "ok"
        except Exception as e:  # noqa: BLE001 - record and go on: the next item may still work
            rows, status = (
                [{"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}],
                "failed",
            )
        results.append({"item": name, "status": status, "seconds": round(time.time() - t0, 1), "rows": rows})
        write_json(Path(args.out), env, results)
        print(f"[{status}] {name} ({results[-1]['seconds']} s)", flush=True)
        for r in rows:
            print("   ", {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items() if k != "traceback"})
    return 0 if all(r["status"] == "ok" for r in results) else 1
