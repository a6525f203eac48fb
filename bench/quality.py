"""Prefix vs LoRA accuracy study: ``python -m bench quality``.

Each run trains one method on one task with one seed (the seed picks the train/test
split, the batch order and the initialization; prefix and LoRA runs with the same seed
see the same data in the same order), then evaluates exact-match accuracy on the held-out
test set. Runs append one JSON line to ``--out`` and are skipped when already there, so
an interrupted study resumes where it stopped. ``--table`` prints mean, standard
deviation and range per (task, variant) from that file.

    python -m bench quality --task arithmetic --variants lora prefix prefix-rms --seeds 0 1 2
    python -m bench quality --table
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reasoncache.app.trainer import TrainingDiverged

from .common import check_counts, environment

# Every variant the study has run; bench/results/quality.md's tables name them. The prefix variants use
# P=16 (184K parameters on SmolLM2-135M); LoRA's rank is chosen to match that count.
VARIANTS: dict[str, dict] = {
    "lora": dict(kind="lora", lr=2e-3),
    "prefix": dict(kind="prefix", init="demonstrations", lr=1e-2),
    "prefix-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2),
    "prefix-rms": dict(kind="prefix", init="demonstrations", lr=1e-2, rms_scaled=True),
    "prefix-rms-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2, rms_scaled=True),
    "prefix-rms-lr1e-1": dict(kind="prefix", init="demonstrations", lr=1e-1, rms_scaled=True),
    # the distillation objective (train --objective distill): KL to the frozen model shown 3 demonstrations
    "prefix-distill": dict(kind="prefix", init="demonstrations", lr=3e-2, objective="distill"),
    # issue #12's fair study: LoRA gets its own learning-rate grid, and both methods the
    # constant schedule without clipping (warmup 0, no decay, no gradient-norm clipping)
    "lora-lr1e-3": dict(kind="lora", lr=1e-3),
    "lora-lr5e-3": dict(kind="lora", lr=5e-3),
    "lora-lr1e-2": dict(kind="lora", lr=1e-2),
    "lora-const-lr2e-3": dict(kind="lora", lr=2e-3, warmup_ratio=0.0, min_lr_ratio=1.0, max_grad_norm=0.0),
    "prefix-lr3e-3": dict(kind="prefix", init="demonstrations", lr=3e-3),  # 1e-2 beat 3e-2 on two_quantities
    "prefix-const-lr1e-2": dict(
        kind="prefix", init="demonstrations", lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0, max_grad_norm=0.0
    ),  # fmt: skip
    # the prefix recipe screen: values at their own rate, the model's own sink, token init
    "prefix-v3": dict(kind="prefix", init="demonstrations", lr=1e-2, value_lr_ratio=3.0),
    "prefix-v0.3": dict(kind="prefix", init="demonstrations", lr=1e-2, value_lr_ratio=0.3),
    "prefix-sink": dict(kind="prefix", init="demonstrations", lr=1e-2, sink=True),
    "prefix-tokens": dict(kind="prefix", init="tokens", lr=1e-2),
    "lora-lr3e-3": dict(kind="lora", lr=3e-3),
    # Li & Liang's MLP reparametrization at equal trainable parameters: hidden 15 gives
    # 184,800 (P x h + h x h + h + L x (h + 1) x 2 Hkv D) against the plain prefix's 184,320
    "prefix-mlp15-lr3e-3": dict(kind="prefix", init="demonstrations", lr=3e-3, reparam_hidden=15),
    "prefix-mlp15-lr1e-2": dict(kind="prefix", init="demonstrations", lr=1e-2, reparam_hidden=15),
    "prefix-mlp15-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2, reparam_hidden=15),
    "prefix-mlp15-lr1e-1": dict(kind="prefix", init="demonstrations", lr=1e-1, reparam_hidden=15),
    # with the reparametrization, a position costs only h = 15 parameters (its embedding), so
    # the prefix can grow at a nearly fixed budget: P=32 185,040, P=64 185,520
    "prefix-mlp15-p32-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2, reparam_hidden=15, prefix_len=32),
    "prefix-mlp15-p64-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2, reparam_hidden=15, prefix_len=64),
    # the robustness sweep of issue #12: the default rate (3e-2) times 3; divided by 3 is "prefix"
    "prefix-lr9e-2": dict(kind="prefix", init="demonstrations", lr=9e-2),
    # a second screen: the worked answers as the initialization (a 16-token prefix cut from a
    # demonstration holds only the start of its question), and Adam forgetting the large early
    # gradients sooner (beta2 0.95; 0.999 keeps them in the step-size denominator for the whole run)
    "prefix-answers-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2),
    "prefix-b95-lr3e-2": dict(kind="prefix", init="demonstrations", lr=3e-2, adam_beta2=0.95),
    # the answers initialization's rate divided and multiplied by 3 (the robustness sweep)
    "prefix-answers-lr1e-2": dict(kind="prefix", init="answers", lr=1e-2),
    "prefix-answers-lr9e-2": dict(kind="prefix", init="answers", lr=9e-2),
    # do the screens' helpful changes stack? the answers initialization with Adam's beta2 0.95,
    # and with the MLP reparametrization (each alone helped two_quantities, the family furthest behind)
    "prefix-answers-b95-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, adam_beta2=0.95),
    "prefix-answers-mlp15-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, reparam_hidden=15),
    # NOT at equal parameters: does more prefix capacity close two_quantities' gap to LoRA?
    # P=32 and P=64 hold 2x and 4x the default's 184,320 parameters (LoRA: 172,800)
    "prefix-answers-p32-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, prefix_len=32),
    "prefix-answers-p64-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, prefix_len=64),
    # two passes over half the examples: run at --steps 200, these train on the same 800 examples
    # (and test on the same 200) as a 100-step run, so they tell more steps from more data
    "prefix-answers-2ep-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, epochs=2),
    "lora-2ep-lr5e-3": dict(kind="lora", lr=5e-3, epochs=2),
    # twice the steps at the same examples and the same compute: batch 4, run at --steps 200
    "prefix-answers-b4-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4),
    "lora-b4-lr5e-3": dict(kind="lora", lr=5e-3, batch_size=4),
    # each method's rate grid at batch 4: half the batch is noisier, so a lower rate may suit either
    "prefix-answers-b4-lr1e-2": dict(kind="prefix", init="answers", lr=1e-2, batch_size=4),
    "lora-b4-lr2e-3": dict(kind="lora", lr=2e-3, batch_size=4),
    "lora-b4-lr1e-2": dict(kind="lora", lr=1e-2, batch_size=4),  # 5e-3 beat 2e-3 at batch 4: the grid's top edge
    # the robustness sweep at batch 4: the prefix's rate times 3 (divided by 3 is prefix-answers-b4-lr1e-2)
    "prefix-answers-b4-lr9e-2": dict(kind="prefix", init="answers", lr=9e-2, batch_size=4),
    # a screen past the new default on the two families still behind at batch 4: batch 2 (run at --steps
    # 400: the same 800 examples and compute again), and Adam's beta2 at 0.95 at batch 4
    "prefix-answers-b2-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=2),
    "lora-b2-lr5e-3": dict(kind="lora", lr=5e-3, batch_size=2),
    "prefix-answers-b4-b95-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, adam_beta2=0.95),
    # values at 3x the keys' rate at batch 4 (the values carry what a prefix adds to each head's output)
    "prefix-answers-b4-v3-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, value_lr_ratio=3.0),
    # the moving average of the trained parameters (TrainConfig.ema_decay) at batch 4; LoRA would get it
    # too had it helped the prefix (it did not, quality.md)
    "prefix-answers-b4-ema99-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, ema_decay=0.99),
    # per layer and head rates: keys and values learned in units of their initial RMS (rms_scaled), at batch 4
    "prefix-answers-b4-rms-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, rms_scaled=True),
    # NOT at equal parameters: P=64 (737,280, 4x) at batch 4, to tell a recipe gap from what a prefix can hold
    "prefix-answers-b4-p64-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=64),
    # The prefix's length at the same parameter budget (480 prefix positions over SmolLM2's 30
    # layers, 184,320 parameters, as P=16 on each), through per-layer lengths (``prefix_len`` as a
    # sequence, repeated over the layers; 0: no prefix on that layer). P=32 on half the layers:
    "prefix-answers-b4-p32upper-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(0,) * 15 + (32,) * 15
    ),
    "prefix-answers-b4-p32alt-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(32, 0)),
    # spread unevenly: the lower half at P=32 (the upper half alone lost on both families), and P=24 /
    # P=8 alternating (between the default and P=32 on every second layer, which traded arithmetic
    # for digit_sum)
    "prefix-answers-b4-p32lower-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(32,) * 15 + (0,) * 15
    ),
    "prefix-answers-b4-p24x8-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(24, 8)),
    # the rate robustness sweep of the spread that kept both trade-off families within 0.03 of LoRA
    "prefix-answers-b4-p24x8-lr1e-2": dict(kind="prefix", init="answers", lr=1e-2, batch_size=4, prefix_len=(24, 8)),
    "prefix-answers-b4-p24x8-lr9e-2": dict(kind="prefix", init="answers", lr=9e-2, batch_size=4, prefix_len=(24, 8)),
    # the lower half at P=8 and the upper half at P=24: at seed 0 arithmetic lost far more without
    # the upper half's prefix (P=32 on the lower half only) than without the lower half's
    "prefix-answers-b4-p8lo24hi-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(8,) * 15 + (24,) * 15
    ),
    # p24x8 with the long prefix on the odd layers instead (layer 0 short), and p24x8 with no warmup
    # (Adam starts from the answers initialization, not from noise; LoRA would get it too if it helped)
    "prefix-answers-b4-p8x24-lr3e-2": dict(kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(8, 24)),
    "prefix-answers-b4-p24x8-w0-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(24, 8), warmup_ratio=0.0
    ),
    # p24x8 initialized from the answers as the chat template's assistant turns (the prefix starts with
    # <|im_start|>, the token every input starts with and the model's own attention sink), and p24x8
    # with a slower decay (cosine to 10% of the rate, not to 0: the prefix was short of steps on
    # two_quantities; LoRA would get either if it helped)
    "prefix-turns-b4-p24x8-lr3e-2": dict(kind="prefix", init="turns", lr=3e-2, batch_size=4, prefix_len=(24, 8)),
    # p24x8 initialized from the end of an 8-shot prompt (init="context", bench only: bench_init_cache):
    # the last 24 tokens' keys and values computed with the 8 demonstrations before them in context; and
    # two more bench-only inits for --init-loss (is a sequence-first token at position 0 what it lacks?)
    "prefix-context-b4-p24x8-lr3e-2": dict(kind="prefix", init="context", lr=3e-2, batch_size=4, prefix_len=(24, 8)),
    "prefix-context-first-b4-p24x8-lr3e-2": dict(
        kind="prefix", init="context-first", lr=3e-2, batch_size=4, prefix_len=(24, 8)
    ),
    "prefix-answers-nofirst-b4-p24x8-lr3e-2": dict(
        kind="prefix", init="answers-nofirst", lr=3e-2, batch_size=4, prefix_len=(24, 8)
    ),
    "prefix-random-b4-p24x8-lr3e-2": dict(kind="prefix", init="random", lr=3e-2, batch_size=4, prefix_len=(24, 8)),
    "prefix-tokens-b4-p24x8-lr3e-2": dict(kind="prefix", init="tokens", lr=3e-2, batch_size=4, prefix_len=(24, 8)),
    "prefix-demonstrations-b4-p24x8-lr3e-2": dict(
        kind="prefix", init="demonstrations", lr=3e-2, batch_size=4, prefix_len=(24, 8)
    ),
    # p24x8 with each layer's position 0 frozen (sink=True): the answers' first token is a sequence-first
    # token, the attention sink the input's own first token stops being once it sees a prefix; training
    # moves its values by about their norm (quality.md). 172,800 trainable parameters, LoRA's count
    "prefix-answers-b4-p24x8-sink-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(24, 8), sink=True
    ),
    "prefix-answers-b4-p24x8-cos10-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(24, 8), min_lr_ratio=0.1
    ),
    # p24x8 with the keys at 3x the values' rate (keys 9e-2, values the default's 3e-2): values at 3x the
    # keys' rate had been 0.013 lower than one rate on the two families then behind (quality.md)
    "prefix-answers-b4-p24x8-k3-lr9e-2": dict(
        kind="prefix", init="answers", lr=9e-2, batch_size=4, prefix_len=(24, 8), value_lr_ratio=1 / 3
    ),
    # p24x8 with position dropout (bench only, with_position_dropout): while training, every layer's
    # prefix drops each position but the first (the sequence-first token, which the init-loss probe
    # showed the prefix cannot lose) with probability 0.15, drawn anew for every layer and step; a
    # regularizer for the families where the prefix trains as low as LoRA but tests lower
    "prefix-answers-b4-p24x8-pdrop15-lr3e-2": dict(
        kind="prefix", init="answers", lr=3e-2, batch_size=4, prefix_len=(24, 8), position_dropout=0.15
    ),
    # the prefix exactly as a user gets it (run_cli): `reasoncache train` on the run's split written as
    # GSM8K rows, with no flag but --seed and --steps (300 is its default), then `reasoncache eval`.
    # batch_size: the CLI's default batch, so that the split is the examples one pass at --steps sees
    "prefix-cli-defaults": dict(kind="cli", batch_size=4),
}

# The study's batch for variants that name none: the demo's batch when the study began. Pinned here,
# not read from the demo's DEFAULTS, so that a variant's runs mean the same whatever the demo uses.
STUDY_BATCH = 8
# The study's prefix length for variants that name none, pinned for the same reason (the demo's
# default became per-layer lengths after the study's P=16 runs).
STUDY_PREFIX_LEN = 16

# relative to the working directory: run from the repository root, it appends to the committed results
DEFAULT_OUT = Path("bench") / "results" / "quality_cpu_smollm2.jsonl"


def run_dir(task: str, variant: str, seed: int, steps: int) -> Path:
    """Where ``run_one`` keeps a run's checkpoint (its trained parameters), which ``--errors`` reads;
    one folder per (task, variant, seed, steps), so a longer run does not overwrite a shorter one's."""
    return Path(tempfile.gettempdir()) / f"reasoncache_quality_{task}_{variant}_{seed}_{steps}"


def split(task: str, variant: str, seed: int, steps: int, n_test: int | None = None) -> tuple[list, list]:
    """A run's training and test examples: ``steps`` x batch (8, or the variant's ``batch_size``)
    examples seen, so that / ``epochs`` distinct training examples, then ``n_test`` test examples.
    Runs with the same number of training examples share both sets (``make_split``)."""
    from reasoncache.app.demo import DEFAULTS
    from reasoncache.app.tasks import make_split

    epochs = VARIANTS[variant].get("epochs", 1)
    seen = steps * VARIANTS[variant].get("batch_size", STUDY_BATCH)
    if seen % epochs:
        raise SystemExit(f"--steps {steps}: {variant} makes {epochs} passes, so {seen} examples must divide by them")
    return make_split(task, seen // epochs, n_test or DEFAULTS["n_test"], seed)


# demonstrations the bench-only "context" initializations compute their prefix after
CONTEXT_SHOTS = 8
# initializations only the bench builds (bench_init_cache), to screen why a prefix starts well
BENCH_INITS = ("context", "context-first", "answers-nofirst")


def bench_init_cache(model, tok, train: list, prefix_len, init: str, seed: int):
    """A prefix from one of ``BENCH_INITS`` (lost or diagnostic, so not offered by
    ``build_cache``; quality.md), keys and values ``[layers, kv heads, P, head dim]`` with
    ``P = max(prefix_len)``, each token at the position it holds right before the input:

    - ``"context"``: ``CONTEXT_SHOTS`` training demonstrations (question and worked answer,
      plain text, shuffled by ``seed`` as ``build_cache`` shuffles) in one sequence; the prefix
      is its last ``P`` tokens, computed with all of them in context;
    - ``"context-first"``: the same, with position 0 the sequence's first token computed alone
      (a sequence-first token, as the answers initialization's position 0 is) and the last
      ``P - 1`` tokens after it;
    - ``"answers-nofirst"``: the answers initialization's first ``P + 1`` tokens, computed
      together, without the first: the answers init with its sequence-first token gone.
    """
    import random

    from reasoncache import ReasonCache, build_cache
    from reasoncache.cache import fingerprint, first_token_keys_values, model_shape, per_layer_lengths

    if init not in BENCH_INITS:
        raise ValueError(f"init must be one of {BENCH_INITS}, got {init!r}")
    shape = model_shape(model)
    lengths = per_layer_lengths(prefix_len, shape.num_layers)
    P = max(lengths)
    if init == "answers-nofirst":  # the answers init one token longer, its first position dropped
        longer = build_cache(model, tok, train, P + 1, "answers", seed=seed)
        keys, values = longer.keys[:, :, 1:], longer.values[:, :, 1:]
        return ReasonCache(shape, keys, values, model_fingerprint=fingerprint(model), layer_lengths=lengths)
    order = list(train)
    random.Random(seed).shuffle(order)
    ids = [
        i
        for e in order[:CONTEXT_SHOTS]
        for i in tok(f"{e.prompt}\n{e.completion}\n\n", add_special_tokens=False).input_ids
    ]
    if len(ids) <= P:
        raise ValueError(f"the demonstrations make only {len(ids)} tokens; init={init!r} needs more than {P}")
    cache = ReasonCache.from_demonstrations(model, torch.tensor([ids]), layer_lengths=lengths, keep_last=P)
    if init == "context":
        return cache
    # "context-first": position 0 becomes the sequence's first token computed alone, where position 0 sits
    k0, v0 = first_token_keys_values(model, torch.tensor([ids[:1]]), P)
    keys, values = torch.cat([k0, cache.keys[:, :, 1:]], 2), torch.cat([v0, cache.values[:, :, 1:]], 2)
    return ReasonCache(
        shape, keys.detach(), values.detach(), model_fingerprint=fingerprint(model), layer_lengths=lengths
    )


def with_position_dropout(cache, p: float) -> None:
    """Bench only: while ``cache`` is in training mode, each call of ``cache.layer(i)`` keeps
    position 0 and every other position with probability ``1 - p`` (the CPU generator, drawn
    anew per layer and step, so the Trainer's checkpoint holds its state); in eval mode every
    position. Keys are stored rotated, so the kept ones stay where they were. Not for gradient
    checkpointing (a recomputed layer would draw another mask)."""
    whole = cache.layer

    def layer(i: int):
        k, v = whole(i)
        if not cache.training:
            return k, v
        keep = torch.rand(k.shape[1]) >= p
        keep[0] = True
        idx = keep.nonzero().flatten().to(k.device)
        return k[:, idx], v[:, idx]

    cache.layer = layer


def _prepare(task: str, variant: str, seed: int, steps: int, model_path, n_test: int | None):
    """The run's model (patched with its initial prefix, or wrapped with LoRA), tokenizer,
    train/test split and trainable-parameter count; the same for ``run_one`` and ``--errors``."""
    from reasoncache import build_cache, patch
    from reasoncache.app.baselines import matched_lora
    from reasoncache.app.models import load_model

    v = VARIANTS[variant]
    torch.manual_seed(seed)
    model, tok = load_model(model_path, device="cpu")
    train, test = split(task, variant, seed, steps, n_test)
    if v.get("init") in BENCH_INITS:
        cache = bench_init_cache(model, tok, train, v["prefix_len"], v["init"], seed)
    else:
        cache = build_cache(
            model,
            tok,
            train,
            v.get("prefix_len", STUDY_PREFIX_LEN),
            v.get("init", "demonstrations"),
            seed=seed,
            sink=v.get("sink", False),
            reparam_hidden=v.get("reparam_hidden", 0),
            rms_scaled=v.get("rms_scaled", False),
        )
    if v.get("position_dropout"):
        with_position_dropout(cache, v["position_dropout"])
    n_prefix = cache.num_trainable_parameters()
    if v["kind"] == "prefix":
        patch(model, cache)
        return model, tok, train, test, n_prefix
    trained, _, n_params = matched_lora(model, n_prefix)
    return trained, tok, train, test, n_params


def _train_config(variant: str, seed: int, steps: int):
    """The TrainConfig of a study run of ``variant``: the same for ``run_one`` and ``--errors``
    (whose checkpoint must have been written under it)."""
    from reasoncache.app.demo import DEFAULTS
    from reasoncache.app.trainer import TrainConfig

    v = VARIANTS[variant]
    return TrainConfig(
        steps=steps,
        batch_size=v.get("batch_size", STUDY_BATCH),
        lr=v["lr"],
        seed=seed,
        eval_at_end=False,
        checkpoint_every=10**9,
        max_new_tokens=DEFAULTS["max_new_tokens"],
        objective=v.get("objective", "sft"),
        warmup_ratio=v.get("warmup_ratio", 0.1),
        min_lr_ratio=v.get("min_lr_ratio", 0.0),
        max_grad_norm=v.get("max_grad_norm", 1.0),
        value_lr_ratio=v.get("value_lr_ratio", 1.0),
        adam_beta2=v.get("adam_beta2", 0.999),
        ema_decay=v.get("ema_decay", 0.0),
    )


def init_loss(task: str, variant: str, seed: int, *, steps: int, model_path=None, n: int = 64) -> float:
    """The completion loss per token (cross-entropy, nats) of ``variant``'s model before any
    training step, on the first ``n`` test examples of its run's split: how well an
    initialization starts (LoRA starts as the frozen model)."""
    from reasoncache.app.data import collate, encode
    from reasoncache.app.trainer import completion_loss

    model, tok, _, test, _ = _prepare(task, variant, seed, steps, model_path, n)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(test), 16):
            batch = collate([encode(tok, e) for e in test[i : i + 16]], tok.pad_token_id)
            loss, k = completion_loss(model, batch)
            total, count = total + float(loss), count + k
    return total / count


def trained_row(
    task: str, variant: str, seed: int, steps: int, batch_size: int, n_params: int, train_s: float, log: list[dict]
) -> dict:
    """A run's row before its accuracy: what ran, its trainable parameters, its training time and
    the mean loss of its last 10 steps, from the Trainer's log rows (``Trainer.train``'s return
    value, or its ``log.jsonl`` read back)."""
    losses = [r["loss"] for r in log if "loss" in r]
    return {
        "task": task,
        "variant": variant,
        "config": VARIANTS[variant],
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "trainable_params": n_params,
        "train_s": round(train_s, 1),
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
    }


def run_one(
    task: str, variant: str, seed: int, *, steps: int, evaluate_test: bool, model_path=None, n_test: int | None = None
) -> dict:
    """Train ``variant`` on ``task`` at ``seed`` for ``steps`` steps; return its row (accuracy on the
    test split when ``evaluate_test``), as appended to the study's JSONL."""
    from reasoncache.app.demo import DEFAULTS
    from reasoncache.app.evaluate import evaluate
    from reasoncache.app.trainer import Trainer

    trained, tok, train, test, n_params = _prepare(task, variant, seed, steps, model_path, n_test)
    cfg = _train_config(variant, seed, steps)
    out_dir = run_dir(task, variant, seed, steps)
    t0 = time.time()
    history = Trainer(trained, tok, train, cfg, out_dir, progress=False).train()
    row = trained_row(task, variant, seed, steps, cfg.batch_size, n_params, time.time() - t0, history)
    if evaluate_test:
        trained.eval()
        res = evaluate(trained, tok, test, max_new_tokens=DEFAULTS["max_new_tokens"])
        row.update(accuracy=res["accuracy"], n=res["n"])
    return row


_CALC_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def gsm8k_row(example) -> dict:
    """An example as a GSM8K row ``{"question", "answer"}``, with a calculator note in every
    'a op b = c' of the worked answer as GSM8K writes them ('12 - 5 = <<12-5=7>>7'); reading
    the row back (``load_jsonl``) drops the notes and gives the example's completion again."""
    return {"question": example.prompt, "answer": _CALC_STEP.sub(r"\1 \2 \3 = <<\1\2\3=\4>>\4", example.completion)}


def run_cli(
    task: str, variant: str, seed: int, *, steps: int, evaluate_test: bool, model_path=None, n_test: int | None = None
) -> dict:
    """A ``kind="cli"`` variant's run: the split of ``run_one`` written as GSM8K rows (``gsm8k_row``),
    ``reasoncache train`` on them with only ``--seed`` and ``--steps`` given (and ``--model`` where
    ``model_path`` is), then ``reasoncache eval`` of its cache on the test rows; both commands in
    subprocesses of this interpreter, their output in the run's folder (``run_dir``). Returns the
    row ``run_one`` would."""
    import shutil
    import subprocess
    import sys

    from reasoncache import ReasonCache
    from reasoncache.app.trainer import TrainConfig

    if VARIANTS[variant]["batch_size"] != TrainConfig.batch_size:  # the CLI's default batch is TrainConfig's
        raise SystemExit(
            f"{variant}: batch_size {VARIANTS[variant]['batch_size']} is not the CLI's default batch "
            f"{TrainConfig.batch_size}, so its split would not be the examples `reasoncache train` sees once"
        )
    train, test = split(task, variant, seed, steps, n_test)
    folder = run_dir(task, variant, seed, steps)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, examples in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(gsm8k_row(e)) + "\n" for e in examples))
    cli, out = [sys.executable, "-m", "reasoncache"], folder / "run"
    model = ["--model", str(model_path)] if model_path else []

    def call(args: list[str], log: str) -> str:
        with (folder / log).open("w") as f:
            done = subprocess.run(cli + args + model, stdout=subprocess.PIPE, stderr=f, text=True)
        if done.returncode == 1 and args[0] == "train":  # the CLI's status for a diverged run
            lines = (folder / log).read_text().strip().splitlines()
            raise TrainingDiverged(lines[-1] if lines else f"reasoncache train exited 1; see {folder / log}")
        if done.returncode:
            raise SystemExit(f"{' '.join(cli + args)} failed ({done.returncode}); its stderr: {folder / log}")
        return done.stdout

    t0 = time.time()
    data = str(folder / "train.jsonl")
    call(["train", "--data", data, "--out", str(out), "--seed", str(seed), "--steps", str(steps)], "train.log")
    train_s = time.time() - t0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    n_params = ReasonCache.from_pretrained(out / "cache").num_trainable_parameters()
    row = trained_row(task, variant, seed, steps, VARIANTS[variant]["batch_size"], n_params, train_s, log)
    if evaluate_test:
        res = json.loads(
            call(["eval", "--cache", str(out), "--data", str(folder / "test.jsonl")], "eval.log").splitlines()[-1]
        )
        row.update(accuracy=res["accuracy"], n=res["n"])
    return row


def solution_steps(text: str) -> list[str]:
    """A worked solution's steps: its sentences and the ``#### answer`` part.
    '4 * 6 = 24. 24 - 9 = 15. #### 15' -> ['4 * 6 = 24.', '24 - 9 = 15.', '#### 15']."""
    return [x for x in re.split(r"(?<=\.)\s+|\s*(?=####)", text.strip()) if x]


def first_wrong_step(generation: str, gold: str) -> int:
    """1-based index of the first step of ``generation`` that differs from the gold worked
    solution ``gold`` (``len(solution_steps(gold)) + 1`` when every gold step is there)."""
    got, want = solution_steps(generation), solution_steps(gold)
    for i, w in enumerate(want):
        if i >= len(got) or got[i] != w:
            return i + 1
    return len(want) + 1


def errors(task: str, variant: str, seed: int, *, steps: int, model_path=None, n_test: int | None = None) -> dict:
    """Re-evaluate a finished ``run_one`` run from its checkpoint (``run_dir``) and count
    its wrong answers by the first step where the generation leaves the gold solution."""
    from reasoncache.app.demo import DEFAULTS
    from reasoncache.app.evaluate import evaluate
    from reasoncache.app.trainer import Trainer

    path = run_dir(task, variant, seed, steps) / "checkpoint.pt"
    if not path.is_file():
        raise SystemExit(
            f"--errors: no checkpoint at {path}; train the run first: python -m bench quality --task {task} "
            f"--variants {variant} --seeds {seed} --steps {steps} --out NEW_FILE"
        )
    trained, tok, train, test, _ = _prepare(task, variant, seed, steps, model_path, n_test)
    # the Trainer's own resume: it refuses a checkpoint of other settings or other parameters
    trainer = Trainer(trained, tok, train, _train_config(variant, seed, steps), path.parent, progress=False)
    try:
        trainer.load_checkpoint()
    except ValueError as e:
        raise SystemExit(f"--errors: {e}") from e
    if trainer.step != steps:
        raise SystemExit(f"--errors: {path} is at step {trainer.step}, not --steps {steps}")
    trainer.hold_average()  # what run_one evaluated, where the variant keeps a moving average
    trained.eval()
    res = evaluate(trained, tok, test, max_new_tokens=DEFAULTS["max_new_tokens"])
    where: dict[int, int] = {}
    for ex, p in zip(test, res["predictions"]):
        if not p["correct"]:
            k = first_wrong_step(p["generation"], ex.completion)
            where[k] = where.get(k, 0) + 1
    return {"task": task, "variant": variant, "seed": seed, "accuracy": res["accuracy"], "n": res["n"],
            "first_wrong_step": dict(sorted(where.items())), "solution": test[0].completion}  # fmt: skip


def _done_as(row: dict) -> tuple[bool, ...]:
    """The ``evaluate_test`` values a recorded row answers: its own, or both for a diverged run."""
    return (True, False) if "diverged" in row else ("accuracy" in row,)


def table(rows: list[dict]) -> str:
    """Markdown: one line per (task, variant, steps) with accuracy mean ± std over seeds (a run
    that diverged is counted beside the seeds, not in the means)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["steps"], r["variant"]), []).append(r)
    out = [
        "| task | variant | config | params | seeds | accuracy mean ± std | min-max | final train loss |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (task, steps, variant), group in sorted(groups.items()):
        rs = [r for r in group if "diverged" not in r]
        cfg = ", ".join(f"{k}={v}" for k, v in group[0]["config"].items() if k != "kind")
        seeds = f"{len(rs)}" + (f" ({len(group) - len(rs)} diverged)" if len(rs) < len(group) else "")
        accs = [r["accuracy"] for r in rs if "accuracy" in r]
        loss = f"{statistics.mean(r['loss_last10'] for r in rs):.3f}" if rs else "-"
        if accs:
            sd = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else " (one seed)"
            acc, rng = f"{statistics.mean(accs):.3f}{sd}", f"{min(accs):.2f}-{max(accs):.2f}"
        else:
            acc = rng = "-"
        params = f"{rs[0]['trainable_params']:,}" if rs else "-"
        out.append(f"| {task} ({steps} steps) | {variant} | {cfg} | {params} | {seeds} | {acc} | {rng} | {loss} |")
    return "\n".join(out)


def _mean_of(n: int) -> str:
    """The label of a table's mean row over ``n`` tasks."""
    return f"mean of {n} task{'s' * (n != 1)}"


def _cells(rows: list[dict], labels: list[str], steps: int, n_test: int) -> dict[tuple, float]:
    """{(task, label, seed): accuracy} over the evaluated runs of ``n_test`` test examples.
    A label is a variant, run for ``steps`` steps, or ``VARIANT@STEPS`` (to set runs of
    different lengths side by side, e.g. batch 8 x 100 against batch 4 x 200). A run
    recorded twice (two files) counts once, the first."""
    want: dict[tuple, str] = {}
    for label in labels:
        name, at, n = label.partition("@")
        if at and not n.isdigit():
            raise ValueError(f"variant label {label!r}: expected VARIANT or VARIANT@STEPS with an integer STEPS")
        want[(name, int(n) if at else steps)] = label
    cells: dict[tuple, float] = {}
    for r in rows:
        label = want.get((r.get("variant"), r.get("steps")))
        if label and r.get("n") == n_test and "accuracy" in r:
            cells.setdefault((r["task"], label, r["seed"]), r["accuracy"])
    return cells


def suite_table(rows: list[dict], prefix: str, lora: str, steps: int = 100, n_test: int = 200) -> str:
    """Markdown: per task, ``prefix`` and ``lora`` accuracy at every seed both ran, their
    means and the paired differences (prefix minus LoRA, same seed: same data and order),
    then the mean over every task at the seeds all tasks share (a task run at more seeds adds
    only those to it, so each task weighs the same), with the standard error of the mean paired
    difference over those runs (sd / sqrt(pairs)). Rows: ``run_one``'s."""
    cells = _cells(rows, [prefix, lora], steps, n_test)
    tasks = sorted({t for t, _, _ in cells})
    per_task = {t: sorted(s for tt, v, s in cells if tt == t and v == prefix and (t, lora, s) in cells) for t in tasks}
    ran = [set(s) for s in per_task.values() if s]
    common = sorted(set.intersection(*ran)) if ran else []
    out = [
        f"| task | seeds | {prefix} | {lora} | {prefix} minus {lora}, per seed | mean difference |",
        "|---|---|---:|---:|---|---:|",
    ]
    means: list[tuple[float, float, float]] = []
    pairs: list[float] = []  # every paired difference at the shared seeds
    for t in tasks:
        seeds = per_task[t]
        if not seeds:
            continue
        a = [cells[(t, prefix, s)] for s in seeds]
        b = [cells[(t, lora, s)] for s in seeds]
        d = [x - y for x, y in zip(a, b)]
        out.append(
            f"| {t} | {','.join(map(str, seeds))} | {statistics.mean(a):.3f} | {statistics.mean(b):.3f} "
            f"| {' / '.join(f'{x:+.3f}' for x in d)} | {statistics.mean(d):+.3f} |"
        )
        if common:
            dc = [cells[(t, prefix, s)] - cells[(t, lora, s)] for s in common]
            ac, bc = ([cells[(t, v, s)] for s in common] for v in (prefix, lora))
            means.append((statistics.mean(ac), statistics.mean(bc), statistics.mean(dc)))
            pairs += dc
    if means:
        worst = min(m[2] for m in means)
        seeds_common = ",".join(map(str, common))
        se = f" ± {statistics.stdev(pairs) / len(pairs) ** 0.5:.3f} ({len(pairs)} pairs)" if len(pairs) > 1 else ""
        out.append(
            f"| **{_mean_of(len(means))}** | {seeds_common} each | **{statistics.mean(m[0] for m in means):.3f}** "
            f"| **{statistics.mean(m[1] for m in means):.3f}** | worst task {worst:+.3f} "
            f"| **{statistics.mean(m[2] for m in means):+.3f}**{se} |"
        )
    return "\n".join(out)


def sweep_table(rows: list[dict], variants: list[str], seed: int = 0, steps: int = 100, n_test: int = 200) -> str:
    """Markdown: accuracy of each of ``variants`` (one column each) per task at ``seed``, and
    the mean over the tasks every variant ran, with its change from the first variant."""
    cells = _cells(rows, variants, steps, n_test)
    tasks = sorted({t for t, _, s in cells if s == seed})
    out = ["| task | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    complete = []
    for t in tasks:
        accs = [cells.get((t, v, seed)) for v in variants]
        out.append(f"| {t} | " + " | ".join("-" if a is None else f"{a:.3f}" for a in accs) + " |")
        if None not in accs:
            complete.append(accs)
    if complete:
        avg = [statistics.mean(c[i] for c in complete) for i in range(len(variants))]
        out.append(
            f"| **{_mean_of(len(complete))}** | "
            + " | ".join(f"**{a:.3f}**" + ("" if i == 0 else f" ({a - avg[0]:+.3f})") for i, a in enumerate(avg))
            + " |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None, prog: str = "python -m bench quality") -> None:
    from reasoncache.app.tasks import TASKS

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    # metavars keep the usage line short; the choices (still checked) are listed once, in the help
    ap.add_argument(
        "--task", nargs="+", default=["arithmetic"], choices=sorted(TASKS), metavar="TASK",
        help=f"task families to run: {', '.join(sorted(TASKS))}",
    )  # fmt: skip
    ap.add_argument(
        "--variants", nargs="+", default=["lora", "prefix"], choices=sorted(VARIANTS), metavar="VARIANT",
        help=f"recipes to run (VARIANTS in bench/quality.py): {', '.join(sorted(VARIANTS))}",
    )  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--steps", type=int, default=100, help="training steps of batch 8 or of the variant's batch_size (demo: 100)"
    )
    ap.add_argument("--no-eval", action="store_true", help="train only and record the loss (a quick screen)")
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--n-test", type=int, default=None, help="test examples per run (default: the demo's 100)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines file the runs append to")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    ap.add_argument(
        "--suite", nargs=2, metavar=("PREFIX", "LORA"),
        help="print the paired per-seed table of two variants over every task in --rows and exit "
        "(VARIANT@STEPS: that variant's runs of STEPS steps instead of --steps)",
    )  # fmt: skip
    ap.add_argument(
        "--sweep", nargs="+", metavar="VARIANT",
        help="print the accuracy of these variants per task at the first --seeds in --rows and exit "
        "(VARIANT@STEPS as for --suite)",
    )  # fmt: skip
    ap.add_argument(
        "--errors", action="store_true",
        help="re-evaluate finished runs from their checkpoints and print where their wrong answers go wrong",
    )  # fmt: skip
    ap.add_argument(
        "--rows", nargs="+", type=Path, default=None,
        help="JSON-lines files --suite/--sweep read (default: every bench/results/*.jsonl)",
    )  # fmt: skip
    ap.add_argument(
        "--init-loss", action="store_true",
        help="print each variant's completion loss per token on 64 test examples before any training, and exit",
    )  # fmt: skip
    args = ap.parse_args(argv)
    check_counts(ap, args, "steps", "n_test")
    if min(args.seeds) < 0:
        ap.error(f"--seeds must be >= 0, got {min(args.seeds)}")
    cli = [v for v in args.variants if VARIANTS[v]["kind"] == "cli"]
    if cli and (args.init_loss or args.errors):
        ap.error(f"--init-loss and --errors build the run's model in this process; {cli} train through the CLI")
    if args.init_loss:
        print("| task | seed | variant | loss per token before training |\n|---|---:|---|---:|")
        for seed in args.seeds:
            for task in args.task:
                for variant in args.variants:
                    loss = init_loss(task, variant, seed, steps=args.steps, model_path=args.model)
                    print(f"| {task} | {seed} | {variant} | {loss:.3f} |", flush=True)
        return
    if args.suite or args.sweep:
        for label in args.suite or args.sweep:
            name, at, n = label.partition("@")
            if name not in VARIANTS or (at and not n.isdigit()):
                ap.error(f"--suite/--sweep {label!r}: expected VARIANT or VARIANT@STEPS of {sorted(VARIANTS)}")
        files = args.rows or sorted((Path("bench") / "results").glob("*.jsonl"))
        rows = [json.loads(x) for f in files for x in f.read_text().splitlines() if x.strip()]
        n_test = args.n_test or 200
        if args.suite:
            print(suite_table(rows, *args.suite, steps=args.steps, n_test=n_test))
        else:
            print(sweep_table(rows, args.sweep, seed=args.seeds[0], steps=args.steps, n_test=n_test))
        return
    if args.errors:
        print("| task | variant | seed | accuracy | wrong | wrong answers by first wrong step | a gold solution |")
        print("|---|---|---:|---:|---:|---|---|")
        for seed in args.seeds:
            for task in args.task:
                for variant in args.variants:
                    e = errors(task, variant, seed, steps=args.steps, model_path=args.model, n_test=args.n_test)
                    where = ", ".join(f"step {k}: {c}" for k, c in e["first_wrong_step"].items())
                    print(
                        f"| {task} | {variant} | {seed} | {e['accuracy']:.3f} | {sum(e['first_wrong_step'].values())} "
                        f"| {where} | `{e['solution']}` |",
                        flush=True,
                    )
        return
    done = [json.loads(x) for x in args.out.read_text().splitlines() if x.strip()] if args.out.exists() else []
    if args.table:
        print(table(done))
        return
    # a diverged run is done either way: running it again diverges again
    have = {(r["task"], r["variant"], r["seed"], r["steps"], e) for r in done for e in _done_as(r)}
    env = environment("cpu")
    for seed in args.seeds:  # seed-major: every variant gets seed 0 before any gets seed 1
        for task in args.task:
            for variant in args.variants:
                if (task, variant, seed, args.steps, not args.no_eval) in have:
                    continue
                run = run_cli if VARIANTS[variant]["kind"] == "cli" else run_one
                try:
                    row = run(task, variant, seed, steps=args.steps, evaluate_test=not args.no_eval,
                              model_path=args.model, n_test=args.n_test)  # fmt: skip
                except TrainingDiverged as e:  # a row that says so; the other runs go on
                    row = {"task": task, "variant": variant, "seed": seed, "steps": args.steps,
                           "config": VARIANTS[variant], "diverged": str(e)}  # fmt: skip
                row.update(commit=env.get("git_commit"), torch=env.get("torch"), threads=torch.get_num_threads())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                keys = ("task", "variant", "seed", *(["diverged"] if "diverged" in row else ["loss_last10", "train_s"]))
                print(json.dumps({k: row[k] for k in keys} | {"accuracy": row.get("accuracy")}), flush=True)


if __name__ == "__main__":
    main()
