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

from .evaluate import evaluate
from .hf import patch, unpatch
from .models import load_model
from .tasks import make_split
from .trainer import TrainConfig, Trainer, build_cache

DEFAULTS = dict(
    task="arithmetic",
    n_test=100,
    prefix_len=16,
    shots=3,
    batch_size=8,
    prefix_lr=3e-2,  # 1e-2 trailed LoRA; see bench/results/quality.md
    lora_lr=2e-3,
    curve_points=4,
    curve_n=40,
    max_new_tokens=48,
    seed=0,
)


def lora_rank_for(model, target_params: int, modules=("q_proj", "v_proj")) -> int:
    """The LoRA rank on ``modules`` whose parameter count is closest to ``target_params``."""
    per_rank = 0
    for name, m in model.named_modules():
        if name.split(".")[-1] in modules and isinstance(m, torch.nn.Linear):
            per_rank += m.in_features + m.out_features
    if per_rank == 0:
        raise ValueError(f"the model has no {modules} linear layers for LoRA")
    return max(1, round(target_params / per_rank))


def matched_lora(model, target_params: int, modules=("q_proj", "v_proj")):
    """``model`` wrapped with LoRA on ``modules`` at the rank whose parameter count is
    closest to ``target_params`` (alpha = 2 * rank, no dropout): the demo's and the
    benchmarks' equal-parameter baseline. Returns (peft model, rank, trainable params)."""
    from peft import LoraConfig, get_peft_model

    r = lora_rank_for(model, target_params, modules)
    net = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(modules)))
    return net, r, sum(p.numel() for p in net.parameters() if p.requires_grad)


def _train_and_eval(model, tok, train, test, cfg: TrainConfig, out: Path, label: str) -> dict:
    trainer = Trainer(model, tok, train, cfg, out, eval_examples=test)
    t0 = time.time()
    history = trainer.train()
    train_s = time.time() - t0
    model.eval()
    res = evaluate(model, tok, test, max_new_tokens=cfg.max_new_tokens, progress=True)
    curve = [(r["examples_seen"], r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
    curve.append((cfg.steps * cfg.batch_size, res["accuracy"]))
    print(f"{label}: accuracy {res['accuracy']:.2f} after {cfg.steps} steps ({train_s:.0f} s)", flush=True)
    return {"result": res, "train_s": train_s, "curve": curve}


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
    steps = steps or (20 if quick else 100)
    if quick:
        o.update(n_test=16, curve_n=8, curve_points=2)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o["seed"])
    t_start = time.time()
    model, tok = load_model(model_path, device=device, progress=True)
    n_train = steps * o["batch_size"]
    train, test = make_split(o["task"], n_train, o["n_test"], o["seed"])
    gen = dict(max_new_tokens=o["max_new_tokens"], progress=True)
    rows = []

    # 1) zero-shot and k-shot in-context learning
    for k in (0, o["shots"]):
        t0 = time.time()
        res = evaluate(model, tok, test, shots=train[:k], **gen)
        rows.append(
            {
                "method": "zero-shot" if k == 0 else f"{k}-shot ICL",
                "accuracy": res["accuracy"],
                "n": res["n"],
                "trainable_params": 0,
                "prompt_tokens": res["prompt_tokens"],
                "train_s": 0.0,
                "eval_s": time.time() - t0,
                "curve": [(k, res["accuracy"])],
            }
        )
        print(f"{rows[-1]['method']}: accuracy {res['accuracy']:.2f}", flush=True)

    every = max(1, steps // o["curve_points"])
    cfg = dict(
        steps=steps,
        batch_size=o["batch_size"],
        seed=o["seed"],
        max_new_tokens=o["max_new_tokens"],
        eval_steps=list(range(0, steps, every)),
        eval_at_end=False,  # the full final evaluation below is the curve's last point
        eval_limit=o["curve_n"],
        checkpoint_every=steps,
    )

    # 2) ReasonCACHE: a learned prefix, initialised from demonstrations
    cache = build_cache(model, tok, train, o["prefix_len"], "demonstrations", seed=o["seed"])
    patch(model, cache)
    rc = _train_and_eval(
        model, tok, train, test, TrainConfig(lr=o["prefix_lr"], **cfg), outdir / "reasoncache", "ReasonCACHE"
    )
    cache.save_pretrained(outdir / "reasoncache" / "cache")
    n_rc = cache.num_trainable_parameters()
    res = rc["result"]
    rows.append(
        {
            "method": f"ReasonCACHE (P={o['prefix_len']})",
            "accuracy": res["accuracy"],
            "n": res["n"],
            "trainable_params": n_rc,
            "prefix_positions": o["prefix_len"],
            "prompt_tokens": res["prompt_tokens"],
            "train_s": rc["train_s"],
            "curve": rc["curve"],
        }
    )
    unpatch(model)

    # 3) LoRA with about the same number of trainable parameters, same data and steps
    lora, r, n_lora = matched_lora(model, n_rc)
    lo = _train_and_eval(lora, tok, train, test, TrainConfig(lr=o["lora_lr"], **cfg), outdir / "lora", f"LoRA r={r}")
    res = lo["result"]
    rows.append(
        {
            "method": f"LoRA (r={r}, q,v)",
            "accuracy": res["accuracy"],
            "n": res["n"],
            "trainable_params": n_lora,
            "prompt_tokens": res["prompt_tokens"],
            "train_s": lo["train_s"],
            "curve": lo["curve"],
        }
    )

    total_s = time.time() - t_start
    summary = {
        "task": o["task"],
        "train_examples": n_train,
        "test_examples": o["n_test"],
        "steps": steps,
        "batch_size": o["batch_size"],
        "seed": o["seed"],
        "prefix_lr": o["prefix_lr"],
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

    from . import __version__

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


__all__ = ["run_demo", "render_table", "plot_curves", "lora_rank_for", "matched_lora"]
