"""``reasoncache demo``: teach the frozen default model a skill and compare with
zero-shot, in-context learning and LoRA, offline on CPU.

Every number comes from a real run on the same train/test split (seeded). ReasonCACHE
and LoRA train on the same examples in the same order for the same steps, with about
the same number of trainable parameters. Accuracy-vs-examples curves come from
evaluating each run on a fixed slice of the test set as it passes through the
training data once (each example is seen once, so "examples seen" is the number of
training examples used).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._checks import is_int_at_least
from .._version import __version__
from ..cache import build_cache
from ..hf import patch, unpatch
from .baselines import in_context, matched_lora
from .evaluate import evaluate
from .models import load_model
from .tasks import make_split
from .trainer import TrainConfig, Trainer

DEFAULTS = dict(
    task="arithmetic",
    n_test=100,
    # 24 positions on even layers, 8 on odd ones: the budget of 16 on every layer, spread so that no
    # family of the suite trails tuned LoRA by more than 0.03 (bench/results/quality.md, issue #12)
    prefix_len=(24, 8),
    prefix_init="answers",  # the worked answers' keys/values: the suite's best start (bench/results/quality.md)
    shots=3,
    # 200 steps of batch 4 over 800 examples: twice the optimizer steps of batch 8 at the same examples and
    # compute raised both methods' suite mean by 0.035 (bench/results/quality.md, "Batch 4 at three seeds")
    steps=200,
    batch_size=TrainConfig.batch_size,  # the recipe of `reasoncache train` and TrainConfig, from one place
    prefix_lr=TrainConfig.lr,  # 3e-2; 1e-2 trailed LoRA, see bench/results/quality.md
    lora_lr=5e-3,  # LoRA's best of its own grid 1e-3..1e-2 (issue #12 study), never the prefix's recipe
    curve_points=4,
    curve_n=40,
    max_new_tokens=48,
    seed=0,
)


def _row(method: str, res: dict, curve: list, params: int = 0, train_s: float = 0.0, **extra) -> dict:
    """One line of the results table from an ``evaluate`` result."""
    keep = {k: res[k] for k in ("accuracy", "n", "prompt_tokens")}
    return {"method": method, **keep, "trainable_params": params, "train_s": train_s, "curve": curve, **extra}


def _train_and_eval(model, tok, train, test, cfg: TrainConfig, out: Path, method: str, params: int, **extra) -> dict:
    """Train ``model``'s trainable parameters, evaluate on ``test`` and return its row."""
    trainer = Trainer(model, tok, train, cfg, out, eval_examples=test)
    t0 = time.time()
    history = trainer.train()
    train_s = time.time() - t0
    model.eval()
    res = evaluate(model, tok, test, max_new_tokens=cfg.max_new_tokens, progress=True)
    curve = [(r["examples_seen"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
    curve.append((cfg.steps * cfg.batch_size, res["accuracy"]))
    print(f"{method}: accuracy {res['accuracy']:.2f} after {cfg.steps} steps ({train_s:.0f} s)", flush=True)
    return _row(method, res, curve, params, train_s, **extra)


def run_demo(
    model_path: str | None = None,
    out: str = "reasoncache_demo",
    steps: int | None = None,
    device: str = "cpu",
    quick: bool = False,
    **overrides,
) -> dict:
    """Run the whole comparison; writes ``results.json``, ``accuracy_vs_examples.png`` and
    the trained cache under ``out``; prints one table. Returns the results."""
    o = {**DEFAULTS, **overrides}
    if steps is not None and not is_int_at_least(steps, 1):
        # checked before the model loads; 0 used to mean the default silently
        raise ValueError(f"--steps must be a positive int (or left out for the default), got {steps!r}")
    steps = steps or (DEFAULTS["steps"] // 5 if quick else DEFAULTS["steps"])
    if quick:
        o.update(n_test=16, curve_n=8, curve_points=2)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o["seed"])
    t_start = time.time()
    model, tok = load_model(model_path, device=device, progress=True)
    n_train = steps * o["batch_size"]
    train, test = make_split(o["task"], n_train, o["n_test"], o["seed"])
    rows = []

    # 1) zero-shot and k-shot in-context learning
    for k in (0, o["shots"]):
        t0 = time.time()
        res = in_context(model, tok, test, train[:k], max_new_tokens=o["max_new_tokens"], progress=True)
        rows.append(_row(res["method"], res, [(k, res["accuracy"])], eval_s=time.time() - t0))
        print(f"{rows[-1]['method']}: accuracy {res['accuracy']:.2f}", flush=True)

    every = max(1, steps // o["curve_points"])
    cfg = dict(
        steps=steps,
        batch_size=o["batch_size"],
        seed=o["seed"],
        max_new_tokens=o["max_new_tokens"],
        eval_steps=list(range(0, steps, every)),
        eval_at_end=False,  # the full final evaluation is the curve's last point
        eval_limit=o["curve_n"],
        checkpoint_every=steps,
    )

    # 2) ReasonCACHE: a learned prefix, initialised from training data
    cache = build_cache(model, tok, train, o["prefix_len"], o["prefix_init"], seed=o["seed"])
    patch(model, cache)
    n_rc = cache.num_trainable_parameters()
    lengths = o["prefix_len"] if isinstance(o["prefix_len"], int) else ",".join(map(str, o["prefix_len"]))
    mean_len = sum(cache.layer_lengths) / len(cache.layer_lengths)  # prefix positions per layer, on average
    rows.append(
        _train_and_eval(
            model, tok, train, test, TrainConfig(lr=o["prefix_lr"], **cfg), outdir / "reasoncache",
            f"ReasonCACHE (P={lengths})", n_rc, prefix_positions=int(mean_len) if mean_len.is_integer() else mean_len,
        )
    )  # fmt: skip
    cache.save_pretrained(outdir / "reasoncache" / "cache")
    unpatch(model)

    # 3) LoRA with about the same number of trainable parameters, same data and steps
    lora, r, n_lora = matched_lora(model, n_rc)
    cfg_lora = TrainConfig(lr=o["lora_lr"], **cfg)
    rows.append(_train_and_eval(lora, tok, train, test, cfg_lora, outdir / "lora", f"LoRA (r={r}, q,v)", n_lora))

    total_s = time.time() - t_start
    summary = {
        "task": o["task"],
        "train_examples": n_train,
        "test_examples": o["n_test"],
        "steps": steps,
        "batch_size": o["batch_size"],
        "seed": o["seed"],
        "prefix_lr": o["prefix_lr"],
        "prefix_init": o["prefix_init"],
        "lora_lr": o["lora_lr"],
        "device": device,
        "total_s": total_s,
        "threads": torch.get_num_threads(),
        "environment": _environment(device),
        "rows": rows,
    }
    (outdir / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = render_table(rows)
    (outdir / "results.md").write_text(table + "\n")
    plot_curves(rows, outdir / "accuracy_vs_examples.png", o["task"])
    print("\n" + table)
    print(
        f"\n{o['task']} task, {n_train} training / {o['n_test']} test examples, {steps} steps of batch "
        f"{o['batch_size']}, total {total_s / 60:.1f} min on {device}; wrote {outdir}/results.json and "
        f"{outdir}/accuracy_vs_examples.png"
    )
    return summary


def _environment(device: str) -> dict:
    """Versions and git commit behind a demo run (results must say what produced them)."""
    import platform
    import subprocess

    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "reasoncache": __version__,
        "git_commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def render_table(rows: list[dict]) -> str:
    """The demo's results as a Markdown table, one row per method (``rows``: ``run_demo``'s result rows)."""
    lines = [
        "| method | accuracy | trainable params | prompt tokens at inference (+ cached prefix) | training time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['accuracy']:.2f} (n={r['n']}) | {r['trainable_params']:,} | "
            f"{r['prompt_tokens']:.0f}{' + ' + str(r['prefix_positions']) if r.get('prefix_positions') else ''} | "
            f"{r['train_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plot_curves(rows: list[dict], path: Path, task: str) -> None:
    """Plot each method's accuracy against training examples seen to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        pts = r["curve"]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = "o--" if r["trainable_params"] == 0 else "o-"
        ax.plot(xs, ys, style, label=r["method"])
    ax.set_xscale("symlog", linthresh=4)
    ax.set_xlabel("training examples used (in-context: examples in the prompt)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"reasoncache demo: {task}")
    fig.text(
        0.01,
        0.01,
        "points during training: first 40 test examples; last point of each run: the whole test set",
        fontsize=7,
        color="gray",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run_demo", "render_table", "plot_curves"]
