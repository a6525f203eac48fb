"""The ``reasoncache`` command line: train, eval, generate, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cache import CONFIG_NAME, INITS, check_prefix_len


def _fields_arg(p: argparse.ArgumentParser) -> None:
    """How train and eval read their JSONL rows and the answers in them."""
    p.add_argument("--prompt-field", help="read each row's prompt from this key (with --completion-field)")
    p.add_argument(
        "--completion-field", help="read each row's completion from this key; its answer follows its last '####'"
    )
    p.add_argument(
        "--answer-pattern", default=None, help="regex for the answer (default: after ####, else last number)"
    )


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")


def _ema_decay(text: str) -> float:
    """``--ema-decay``: a number in [0, 1); argparse names the flag when it is not."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) (0: off), got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: off), got {text}")
    return v


def _prefix_len(text: str) -> int | tuple[int, ...]:
    """``--prefix-len``: ``16`` (every layer) or per-layer lengths ``24,8`` (repeated over the layers)."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints (24,8), got {text!r}") from None
    try:
        return check_prefix_len(parts[0] if len(parts) == 1 else parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device(arg: str | None) -> str:
    """``--device``, checked before any model loads: a torch device string this torch can
    use; by default cuda when available, else cpu."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise ValueError(f"--device {arg!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(f"--device {arg}: this torch sees {count} CUDA device(s)")
    return arg


def _cache_folder(path: str) -> Path:
    """``--cache`` may name the cache folder itself or a training output folder holding ``cache/``."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "cache" / CONFIG_NAME).is_file():
        return p / "cache"
    raise FileNotFoundError(f"--cache {path}: no {CONFIG_NAME} there or in {p / 'cache'}")


def _check_generation_flags(args) -> None:
    """Refuse bad generation flags before the model loads (the evaluation would refuse them
    too, but only after loading it)."""
    from .evaluate import check_answer_pattern

    for flag in ("max_new_tokens", "batch_size"):
        v = getattr(args, flag, 1)
        if v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    check_answer_pattern(getattr(args, "answer_pattern", None))


def _load_patched(args):
    from ..cache import ReasonCache
    from ..hf import patch
    from .models import load_model

    folder = _cache_folder(args.cache)
    model, tok = load_model(args.model, device=_device(args.device), progress=True)
    cache = ReasonCache.from_pretrained(folder, model)
    return patch(model, cache), tok


def _check_out_folder(out: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """A fresh run never writes over an earlier one unasked: with neither ``--resume`` nor
    ``--overwrite``, an ``--out`` holding a run is refused; ``--overwrite`` removes that run's
    files (rank 0 does)."""
    import shutil

    from .trainer import CHECKPOINT, LOG

    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: pass one")
    found = [name for name in (CHECKPOINT, LOG, "loss.png", "cache", "tensorboard") if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a training run ({', '.join(found)}): pass --resume to continue it, "
            "--overwrite to start over there, or another --out"
        )
    if rank != 0:
        return
    for name in found:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def cmd_train(args) -> int:
    """``reasoncache train``: build the initial prefix (or LoRA), train it on ``--data`` and save it
    under ``--out``; returns the exit status."""
    import torch

    from ..cache import build_cache
    from ..hf import patch
    from .data import load_jsonl
    from .evaluate import gold_answers
    from .models import load_model
    from .trainer import TrainConfig, Trainer, leave_world, plot_loss_curve, world

    fields = (args.prompt_field, args.completion_field)
    train = load_jsonl(args.data, *fields)
    evals = load_jsonl(args.eval_data, *fields) if args.eval_data else None
    if evals:
        gold_answers(evals, args.answer_pattern)  # before any training: its evaluation would fail at the end
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        eval_every=args.eval_every,
        eval_limit=args.eval_limit,
        max_new_tokens=args.max_new_tokens,
        ema_decay=args.ema_decay,
        chat_template=not args.no_chat_template,
        checkpoint_every=args.checkpoint_every,
        answer_pattern=args.answer_pattern,
        length_grouped=not args.no_length_grouping,
        objective=args.objective,
        distill_shots=args.distill_shots,
        report_to=args.report_to,
        packing=not args.no_packing,
    )
    cfg.check()
    if args.init == "turns" and args.no_chat_template:
        raise ValueError("--init turns writes the answers as chat-template turns; it cannot go with --no-chat-template")
    rank, n = world()
    _check_out_folder(Path(args.out), args.resume, args.overwrite, rank)
    if args.fsdp and n < 2:
        raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N, N >= 2")
    device = _device(args.device)
    if device == "cuda" and n > 1:
        import os

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    # Under --fsdp the model is read into host memory and only its shards reach the GPU.
    load_on = "cpu" if args.fsdp else device
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=load_on, progress=rank == 0)
    cache = build_cache(
        model,
        tok,
        train,
        args.prefix_len,
        args.init,
        seed=args.seed,
        sink=args.sink,
        reparam_hidden=args.reparam_hidden,
        rms_scaled=args.rms_scaled,
    )
    patch(model, cache)
    if args.fsdp:
        from .sharding import shard_frozen_model

        shard_frozen_model(model, device)
    if rank == 0:
        print(
            f"training {cache.num_trainable_parameters():,} prefix parameters ({cache.extra_repr()}) on "
            f"{len(train)} examples, {n} process(es)" + (", frozen model sharded by FSDP2" if args.fsdp else ""),
            flush=True,
        )
    trainer = Trainer(model, tok, train, cfg, args.out, eval_examples=evals)
    trainer.train(resume=args.resume)
    if rank == 0:
        cache.fold().save_pretrained(Path(args.out) / "cache")
        print(f"saved the cache to {Path(args.out) / 'cache'}")
        png = Path(args.out) / "loss.png"
        print(f"wrote {png}" if plot_loss_curve(trainer.history, png) else "no loss.png: matplotlib draws it")
        last = [r for r in trainer.history if "eval_accuracy" in r]
        if last:
            print(
                json.dumps({"accuracy": last[-1]["eval_accuracy"], "n": last[-1]["eval_n"], "step": last[-1]["step"]})
            )
    leave_world()
    return 0


def cmd_eval(args) -> int:
    """``reasoncache eval``: exact-match accuracy on ``--data`` of a saved cache, of the frozen model
    as it is, or of either with ``--shots`` demonstrations in the prompt; returns the exit status."""
    from .baselines import in_context
    from .data import load_jsonl
    from .evaluate import gold_answers
    from .models import load_model

    _check_generation_flags(args)
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    if args.shots and not args.shots_from:
        raise ValueError(f"--shots {args.shots} needs --shots-from FILE (the JSONL the demonstrations come from)")
    data = load_jsonl(args.data, args.prompt_field, args.completion_field)
    gold_answers(data, args.answer_pattern)  # before the model loads: a row it cannot score is an error
    if args.predictions and Path(args.predictions).is_dir():
        raise ValueError(f"--predictions {args.predictions} is a folder; name the JSONL file to write")
    shots = load_jsonl(args.shots_from, args.prompt_field, args.completion_field)[: args.shots] if args.shots else []
    if len(shots) < args.shots:
        raise ValueError(f"--shots {args.shots}: {args.shots_from} holds only {len(shots)} examples")
    if args.cache:
        model, tok = _load_patched(args)
    else:  # the frozen model as it is: the baseline a cache is judged against
        model, tok = load_model(args.model, device=_device(args.device), progress=True)
    res = in_context(
        model,
        tok,
        data,
        shots,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=not args.no_chat_template,
        answer_pattern=args.answer_pattern,
        progress=True,
    )
    if args.predictions:  # its folder is made: a missing one must not cost the evaluation just run
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        Path(args.predictions).write_text("\n".join(json.dumps(p) for p in res["predictions"]) + "\n")
    method = (
        f"reasoncache + {res['method']}" if args.cache and shots else ("reasoncache" if args.cache else res["method"])
    )
    print(json.dumps({"method": method} | {k: res[k] for k in ("accuracy", "n", "prompt_tokens", "examples_per_s")}))
    return 0


def cmd_generate(args) -> int:
    """``reasoncache generate``: print the patched model's greedy answer to one ``--prompt``; returns
    the exit status."""
    from .data import format_prompt
    from .evaluate import generate

    _check_generation_flags(args)
    model, tok = _load_patched(args)
    text = format_prompt(tok, args.prompt, not args.no_chat_template)
    print(generate(model, tok, [text], args.max_new_tokens)[0])
    return 0


def cmd_demo(args) -> int:
    """``reasoncache demo``: the offline demo (``app/demo.py``); returns the exit status."""
    from .demo import run_demo

    run_demo(model_path=args.model, out=args.out, steps=args.steps, device=_device(args.device), quick=args.quick)
    return 0


def cmd_bench(args) -> int:
    """``reasoncache bench SUITE ...``: hand the rest of the command line to the benchmark suite."""
    from ..bench.__main__ import main as bench_main

    return bench_main([args.suite, *args.rest], prog="reasoncache bench")


def build_parser() -> argparse.ArgumentParser:
    """The ``reasoncache`` argument parser: one sub-command per ``cmd_*`` function."""
    ap = argparse.ArgumentParser(prog="reasoncache", description="Teach a frozen LLM a skill as a learned KV prefix.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="learn a prefix from demonstrations (JSONL)")
    t.add_argument("--data", required=True, help="training JSONL: {prompt, completion, answer?} or {messages}")
    t.add_argument("--out", required=True, help="output folder: cache/, checkpoint.pt, log.jsonl")
    _model_arg(t)
    _fields_arg(t)
    t.add_argument(
        "--prefix-len", type=_prefix_len, default=(24, 8), metavar="P[,P...]",
        help="prefix positions per layer, or per-layer lengths repeated over the layers (default 24,8: even "
        "layers 24, odd layers 8, the budget of 16 on each; bench/results/quality.md)",
    )  # fmt: skip
    t.add_argument(
        "--init",
        default="answers",
        choices=INITS,
        help="answers: keys/values of training answers (the suite's best, bench/results/quality.md); demonstrations: "
        "questions and answers; turns: answers as the chat template's assistant turns; random: a sequence-first "
        "token, then draws around the model's own key/value statistics; tokens: random vocabulary tokens",
    )
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    t.add_argument(
        "--batch-size", type=int, default=4,
        help="examples per micro-batch per process (4: more steps per example beat 8 in bench/results/quality.md)",
    )  # fmt: skip
    t.add_argument(
        "--grad-accum", type=int, default=1,
        help="micro-batches per optimizer step (default 1; the batch is batch-size x grad-accum x processes)",
    )  # fmt: skip
    t.add_argument(
        "--lr", type=float, default=3e-2, help="peak learning rate (3e-2: the prefix study in bench/results/quality.md)"
    )
    t.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initialization (which answers, or the random draws) and the data order (default 0)",
    )
    t.add_argument(
        "--ema-decay", type=_ema_decay, default=0.0,
        help="keep this moving average of the trained prefix and save it (0: off, the last step's prefix)",
    )  # fmt: skip
    t.add_argument(
        "--sink",
        action="store_true",
        help="keep prefix position 0 (the attention sink) frozen; it cost arithmetic 0.065 at seed 0 "
        "(bench/results/quality.md)",
    )
    t.add_argument("--reparam-hidden", type=int, default=0, help="MLP reparametrization width (0: off)")
    t.add_argument(
        "--rms-scaled", action="store_true", help="learn keys/values in units of their initial RMS per layer and head"
    )
    t.add_argument(
        "--objective",
        default="sft",
        choices=["sft", "distill"],
        help="sft: cross-entropy on completions; distill: KL to the frozen model shown --distill-shots demos",
    )
    t.add_argument("--distill-shots", type=int, default=3, help="demonstrations the distillation teacher sees")
    t.add_argument("--report-to", choices=["tensorboard"], help="also log to TensorBoard (OUT/tensorboard)")
    t.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="recompute the frozen layers' activations in the backward pass (less memory, about one more forward)",
    )  # fmt: skip
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the frozen model over the processes with FSDP2 (one unit per decoder layer); "
        "the prefix stays whole on every process",
    )
    t.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the frozen weights' dtype (bfloat16 halves their memory; the prefix trains in float32)",
    )
    t.add_argument(
        "--no-length-grouping", action="store_true",
        help="draw micro-batches in plain shuffled order instead of grouping examples of similar length",
    )  # fmt: skip
    t.add_argument(
        "--no-packing",
        action="store_true",
        help="pad every micro-batch to its longest example instead of packing it into one row "
        "(packing is on where the model computes it exactly; the trainer checks)",
    )
    t.add_argument(
        "--checkpoint-every", type=int, default=50,
        help="steps between writes of OUT/checkpoint.pt (default 50; always at the end)",
    )  # fmt: skip
    t.add_argument("--eval-data", help="JSONL to report accuracy on during training")
    t.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    t.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N eval examples")
    t.add_argument("--max-new-tokens", type=int, default=128, help="generation length when evaluating (default 128)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    t.add_argument(
        "--overwrite", action="store_true",
        help="start over in an OUT that holds an earlier run (its checkpoint, log, cache and loss.png are removed)",
    )  # fmt: skip
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="greedy exact-match accuracy with a trained cache, or of the frozen model")
    e.add_argument("--cache", help="cache folder (or a train --out folder); without it, the frozen model as it is")
    e.add_argument("--shots", type=int, default=0, help="K demonstrations before every question (in-context learning)")
    e.add_argument("--shots-from", help="JSONL the --shots demonstrations are taken from (its first K rows)")
    e.add_argument("--data", required=True, help="JSONL to evaluate on: {prompt, completion, answer?} or {messages}")
    _model_arg(e)
    _fields_arg(e)
    e.add_argument("--max-new-tokens", type=int, default=128, help="generation length per answer (default 128)")
    e.add_argument("--batch-size", type=int, default=16, help="questions generated together (default 16)")
    e.add_argument("--predictions", help="write per-example predictions (JSONL) here")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate with a trained cache")
    g.add_argument("--cache", required=True, help="cache folder (or a train --out folder)")
    _model_arg(g)
    g.add_argument("--max-new-tokens", type=int, default=128, help="generation length (default 128)")
    g.add_argument("prompt", help="the question, formatted with the chat template unless --no-chat-template")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="the offline demo: zero-shot, ICL, ReasonCACHE and LoRA on a built-in task")
    _model_arg(d)
    d.add_argument("--out", default="reasoncache_demo", help="folder for results.json, the plot and the cache")
    d.add_argument("--steps", type=int, default=None, help="training steps of batch 4 (default 200; 40 with --quick)")
    d.add_argument("--quick", action="store_true", help="a small fast run (smoke test, not the reported numbers)")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="the benchmarks, the accuracy study and the static GPU audit (bench/)")
    # Not argparse choices: the suites' names live in the benchmarks package, which a source
    # checkout run without installing cannot import; an unknown suite gets bench's usage line.
    b.add_argument("suite", help="kernel, decode, generate, train, quality, audit or smoke")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's options; SUITE --help lists them")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The ``reasoncache`` console script. Returns the exit status: 2 (with the error on stderr, no
    traceback) for a missing file, a bad value or a missing optional dependency; 1 for a
    training run that diverged (a NaN or inf loss; nothing of that step is saved)."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"reasoncache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # the trainer's TrainingDiverged
        print(f"reasoncache {args.command}: error: {e}", file=sys.stderr)
        return 1
