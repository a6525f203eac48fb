"""End-to-end greedy generation speed of a real model: ``python -m bench generate``.

The same prompt and the same number of new tokens (forced with ``min_new_tokens``) for
the unpatched model (its own attention, no prefix) and the model patched with a
``--prefix-len`` prefix (every layer's attention through ``prefix_attention``). The
reported time is the best of ``--reps`` runs after one warm-up, wall clock; on the CPU
give the run the machine to itself and say how many threads it had (``--threads``).

    python -m bench generate --threads 1 --out gen.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .common import check_counts, environment, markdown_table, write_json

COLUMNS = [
    ("model", "model"),
    ("prompt tokens", "prompt_tokens"),
    ("+ prefix", "prefix_len"),
    ("new tokens", "new_tokens"),
    ("best s", "best_s"),
    ("tokens/s", "tokens_per_s"),
]


def _best_s(model, ids, new_tokens: int, reps: int) -> float:
    """Best wall-clock seconds of ``reps`` greedy generations of exactly ``new_tokens`` tokens."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return min(times)


def main(argv: list[str] | None = None, prog: str = "python -m bench generate") -> list[dict]:
    from reasoncache import build_cache, patch
    from reasoncache.app.models import load_model
    from reasoncache.app.tasks import make_split

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the environment and rows")
    args = ap.parse_args(argv)
    check_counts(ap, args, "prefix_len", "new_tokens", "reps", "threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device=args.device)
    model.eval()
    train, test = make_split("arithmetic", 64, 1, 0)
    ids = tok(test[0].prompt, return_tensors="pt").input_ids.to(args.device)
    rows = []
    for label in ("unpatched", "patched"):
        if label == "patched":
            patch(model, build_cache(model, tok, train, args.prefix_len, seed=0))
        s = _best_s(model, ids, args.new_tokens, args.reps)
        rows.append(
            {
                "model": label,
                "prompt_tokens": ids.shape[1],
                "prefix_len": args.prefix_len if label == "patched" else 0,
                "new_tokens": args.new_tokens,
                "best_s": round(s, 3),
                "tokens_per_s": round(args.new_tokens / s, 2),
            }
        )
    env = environment(args.device) | {"threads": torch.get_num_threads()}
    if args.out:
        write_json(args.out, env, rows)
    print(f"# greedy generation on {env['device']}, {env['threads']} thread{'s' * (env['threads'] != 1)}\n")
    print(markdown_table(rows, COLUMNS))
    return rows
