"""The command line, end to end on a tiny model folder (no GGUF, seconds)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import poison_step
from reasoncache.app.cli import main
from reasoncache.app.data import write_jsonl
from reasoncache.app.tasks import make_split
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train, test = make_split("arithmetic", 16, 4, seed=0)
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root, save_tiny(root / "model")


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_eval_generate(workspace, capsys):
    root, model = workspace
    out = root / "run"
    args = [
        "train",
        "--data",
        str(root / "train.jsonl"),
        "--out",
        str(out),
        "--model",
        model,
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--prefix-len",
        "4",
        "--eval-data",
        str(root / "test.jsonl"),
        "--eval-every",
        "2",
        "--max-new-tokens",
        "8",
        "--checkpoint-every",
        "2",
    ]
    assert main(args) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["n"] == 4 and 0 <= res["accuracy"] <= 1 and res["step"] == 4
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval_accuracy" in r] == [2, 4]
    assert (out / "cache" / "reasoncache.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    assert main(args + ["--resume"]) == 0  # already complete: resumes at step 4, trains nothing
    assert "resuming from step 4" in capsys.readouterr().out

    assert (
        main(
            [
                "eval",
                "--cache",
                str(out),
                "--data",
                str(root / "test.jsonl"),
                "--model",
                model,
                "--max-new-tokens",
                "8",
                "--predictions",
                str(root / "new" / "preds.jsonl"),  # a folder that does not exist yet is made
            ]
        )
        == 0
    )
    res = _last_json(capsys.readouterr().out)
    assert set(res) == {"method", "accuracy", "n", "prompt_tokens", "examples_per_s"} and res["n"] == 4
    assert res["method"] == "reasoncache" and res["examples_per_s"] > 0
    assert len((root / "new" / "preds.jsonl").read_text().splitlines()) == 4
    assert main(["eval", "--cache", str(out), "--data", str(root / "test.jsonl"), "--predictions", str(root)]) == 2
    assert "is a folder; name the JSONL file" in capsys.readouterr().err

    assert main(["generate", "--cache", str(out / "cache"), "--model", model, "--max-new-tokens", "5", "Hi"]) == 0


def test_malformed_data_fails_with_file_and_line(workspace, capsys):
    root, model = workspace
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["train", "--data", str(bad), "--out", str(root / "x"), "--model", model]) == 2
    assert f"{bad}:2: missing or non-string 'completion'" in capsys.readouterr().err


def test_missing_cache_and_model_are_clear_errors(workspace, capsys):
    root, model = workspace
    assert main(["eval", "--cache", str(root / "nothing"), "--data", str(root / "test.jsonl"), "--model", model]) == 2
    assert "no reasoncache_config.json" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--data",
                str(root / "train.jsonl"),
                "--out",
                str(root / "y"),
                "--model",
                str(root / "missing.gguf"),
            ]
        )
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err


def test_bad_generation_flags_are_refused_before_the_model_loads(workspace, capsys):
    """The model path is missing on purpose: the flag must be named before anything loads it."""
    root, _ = workspace
    base = ["eval", "--data", str(root / "test.jsonl"), "--model", str(root / "missing.gguf")]
    for extra, msg in (
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
        (["--answer-pattern", "(["], "answer_pattern '([' is not a valid regular expression"),
        (["--device", "tpu"], "--device 'tpu' is not a torch device"),
        (["--device", "cuda:7"], "--device cuda:7: this torch sees"),
    ):
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", "--cache", str(root), "--max-new-tokens", "0", "hi"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--out", str(root / "d"), "--model", str(root / "m.gguf")]) == 2
    assert "--steps must be a positive int" in capsys.readouterr().err
    train = ["train", "--data", str(root / "train.jsonl"), "--out", str(root / "z"), "--model", str(root / "m.gguf")]
    assert main(train + ["--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be a positive int, got 0" in capsys.readouterr().err
    assert main(train + ["--device", "gpu"]) == 2
    assert "--device 'gpu' is not a torch device" in capsys.readouterr().err
    words = root / "words.jsonl"  # answers in words, no '####': nothing to score them by
    words.write_text(json.dumps({"prompt": "Which day follows Monday?", "completion": "Tuesday"}) + "\n")
    for argv in (["eval", "--data", str(words), "--model", str(root / "m.gguf")], train + ["--eval-data", str(words)]):
        assert main(argv) == 2
        assert "1 of 1 examples have no answer to compare with (the first: " in capsys.readouterr().err


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "reasoncache", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and all(c in res.stdout for c in ("train", "eval", "generate", "demo"))


def test_train_and_eval_read_other_field_names(workspace, capsys):
    """--prompt-field/--completion-field map a dataset's own keys (naming one alone is an
    error); --objective distill trains from the same rows."""
    root, model = workspace
    data = root / "own_fields.jsonl"
    train, _ = make_split("two_quantities", 8, 0, seed=1)
    data.write_text("".join(json.dumps({"q": e.prompt, "sol": e.completion}) + "\n" for e in train))
    out = root / "fields_run"
    common = ["--data", str(data), "--model", model, "--prompt-field", "q", "--completion-field", "sol"]
    assert main(["train", *common, "--out", str(out), "--steps", "2", "--batch-size", "2", "--prefix-len", "4"]) == 0
    assert main(["eval", *common, "--cache", str(out), "--max-new-tokens", "4"]) == 0
    assert _last_json(capsys.readouterr().out)["n"] == 8
    distill = [
        "--objective",
        "distill",
        "--distill-shots",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--prefix-len",
        "4",
    ]
    assert main(["train", *common, "--out", str(root / "distill_run"), *distill]) == 0
    assert main(["eval", "--cache", str(out), "--data", str(data), "--model", model, "--prompt-field", "q"]) == 2
    assert "--prompt-field and --completion-field go together" in capsys.readouterr().err


def test_train_takes_per_layer_prefix_lengths(workspace, capsys):
    """--prefix-len 4,2 alternates 4 and 2 over the layers; the saved cache keeps the lengths
    and eval loads it; a malformed list is an argparse error naming the flag."""
    root, model = workspace
    out = root / "per_layer_run"
    common = ["--data", str(root / "train.jsonl"), "--model", model]
    assert main(["train", *common, "--out", str(out), "--steps", "1", "--batch-size", "2", "--prefix-len", "4,2"]) == 0
    assert "P per layer=[4, 2]" in capsys.readouterr().out
    cfg = json.loads((out / "cache" / "reasoncache_config.json").read_text())
    assert cfg["prefix_len"] == 4 and cfg["layer_lengths"] == [4, 2]
    evaluate = ["eval", "--data", str(root / "test.jsonl"), "--model", model, "--cache", str(out)]
    assert main([*evaluate, "--max-new-tokens", "2"]) == 0
    for bad in ("4,x", "0,0", "0"):
        with pytest.raises(SystemExit):
            main(["train", *common, "--out", str(out), "--prefix-len", bad])
        assert "--prefix-len" in capsys.readouterr().err


def test_eval_baselines_frozen_model_and_in_context(workspace, capsys):
    """Without --cache, eval judges the frozen model; --shots K --shots-from F puts K
    demonstrations before every question, in the demo's prompt format."""
    root, model = workspace
    base = ["eval", "--data", str(root / "test.jsonl"), "--model", model, "--max-new-tokens", "4"]
    assert main(base) == 0
    zero = _last_json(capsys.readouterr().out)
    assert zero["method"] == "zero-shot" and zero["n"] == 4
    assert main([*base, "--shots", "2", "--shots-from", str(root / "train.jsonl")]) == 0
    icl = _last_json(capsys.readouterr().out)
    assert icl["method"] == "2-shot ICL" and icl["prompt_tokens"] > zero["prompt_tokens"] + 40
    assert main([*base, "--shots", "2"]) == 2
    assert "--shots 2 needs --shots-from FILE" in capsys.readouterr().err
    assert main([*base, "--shots", "99", "--shots-from", str(root / "train.jsonl")]) == 2
    assert "holds only 16 examples" in capsys.readouterr().err


def test_report_to_tensorboard_without_the_package_says_how_to_get_it(workspace, capsys):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    root, model = workspace
    args = ["train", "--data", str(root / "train.jsonl"), "--out", str(root / "tb"), "--model", model]
    assert main([*args, "--steps", "1", "--batch-size", "2", "--prefix-len", "4", "--report-to", "tensorboard"]) == 2
    assert "needs the tensorboard package: pip install tensorboard" in capsys.readouterr().err


def test_demo_runs_end_to_end_on_a_tiny_model(workspace, tmp_path):
    """The demo's whole pipeline (baselines, prefix, matched LoRA, table, plot) in seconds."""
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    from reasoncache.app.demo import run_demo

    _, model = workspace
    out = tmp_path / "demo"
    res = run_demo(model_path=model, out=str(out), steps=2, quick=True, max_new_tokens=4)
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["zero-shot", "3-shot ICL", "ReasonCACHE (P=24,8)", methods[3]] and methods[3].startswith("LoRA")
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["3-shot ICL"]["prompt_tokens"] > rows["zero-shot"]["prompt_tokens"]
    prefix = rows["ReasonCACHE (P=24,8)"]
    assert prefix["prefix_positions"] == 16  # per layer on average: the tiny model's 2 layers hold 24 and 8
    assert prefix["trainable_params"] > 0 and all(0 <= r["accuracy"] <= 1 for r in res["rows"])
    assert (out / "results.json").is_file() and (out / "accuracy_vs_examples.png").is_file()
    assert (out / "reasoncache" / "cache" / "reasoncache.safetensors").is_file()


def _train_args(root, model, out, *extra):
    return ["train", "--data", str(root / "train.jsonl"), "--out", str(out), "--model", model,
            "--steps", "3", "--batch-size", "2", "--prefix-len", "4", *extra]  # fmt: skip


def test_train_fsdp_under_torchrun_takes_the_single_process_steps(workspace, capsys, tmp_path):
    """`torchrun --nproc-per-node 2 ... train --fsdp` (gloo on CPU) logs the losses of one
    process training on the same global batch; without torchrun, --fsdp says how to launch."""
    import socket

    root, model = workspace
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "reasoncache", *_train_args(root, model, tmp_path / "fsdp", "--fsdp")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sharded by FSDP2" in res.stdout
    assert main(_train_args(root, model, tmp_path / "single", "--grad-accum", "2")) == 0
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("fsdp", "single")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    capsys.readouterr()
    assert main(_train_args(root, model, tmp_path / "alone", "--fsdp")) == 2
    assert "--fsdp shards the model over processes: launch with torchrun" in capsys.readouterr().err


def test_train_cli_trainconfig_and_demo_share_one_default_recipe():
    """`reasoncache train` with no flags, `TrainConfig()` and the demo use one recipe (batch,
    learning rate, initialization, prefix length; the CLI and TrainConfig also the same steps):
    a default changed in one place alone fails here."""
    from reasoncache.app.cli import build_parser
    from reasoncache.app.demo import DEFAULTS
    from reasoncache.app.trainer import TrainConfig

    args = build_parser().parse_args(["train", "--data", "d.jsonl", "--out", "o"])
    cfg = TrainConfig()
    assert (args.batch_size, args.lr, args.steps) == (cfg.batch_size, cfg.lr, cfg.steps)
    assert (args.batch_size, args.lr) == (DEFAULTS["batch_size"], DEFAULTS["prefix_lr"])
    assert (args.init, args.prefix_len) == (DEFAULTS["prefix_init"], DEFAULTS["prefix_len"])
    assert args.ema_decay == cfg.ema_decay


def test_train_with_ema_decay_saves_the_moving_average(workspace, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    root, model = workspace
    out = tmp_path / "run"
    args = ["train", "--data", str(root / "train.jsonl"), "--out", str(out), "--model", model]
    assert main(args + ["--steps", "3", "--batch-size", "2", "--prefix-len", "4", "--ema-decay", "0.5"]) == 0
    saved = load_file(str(out / "cache" / "reasoncache.safetensors"))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"]["ema_decay"] == 0.5
    # the checkpoint's sums from zero, bias-corrected after 3 steps at decay 0.5
    torch.testing.assert_close(saved["keys"], state["ema"]["reasoncache.keys"] / (1 - 0.5**3))
    assert not torch.equal(saved["keys"], state["trainable"]["reasoncache.keys"])  # not the last step's


def test_train_ema_decay_out_of_range_names_the_flag(capsys):
    from reasoncache.app.cli import build_parser

    for bad in ("1", "-0.1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "--data", "d.jsonl", "--out", "o", "--ema-decay", bad])
        assert "argument --ema-decay:" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o", "--ema-decay", "0.99"]).ema_decay == 0.99


def test_train_init_turns_needs_the_chat_template(workspace, capsys, tmp_path):
    """--init turns trains from the answers as assistant turns; with --no-chat-template it is
    refused (before the model loads) by naming both flags."""
    root, model = workspace
    assert main(_train_args(root, model, tmp_path / "turns", "--init", "turns")) == 0
    capsys.readouterr()
    assert main(_train_args(root, model, tmp_path / "plain", "--init", "turns", "--no-chat-template")) == 2
    assert "--init turns" in capsys.readouterr().err and not (tmp_path / "plain").exists()


def test_train_that_diverges_exits_1_and_saves_no_cache(workspace, capsys, tmp_path, monkeypatch):
    """A NaN loss stops `reasoncache train` with exit status 1 and a message naming the step,
    the loss and the rate; no cache of NaNs is written."""
    root, model = workspace
    poison_step(monkeypatch, at=2)
    assert main(_train_args(root, model, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "reasoncache train: error: training diverged at step 2 of 3: the loss is nan" in err
    assert "no checkpoint was written yet" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "cache").exists()


def test_train_into_a_folder_holding_a_run_needs_resume_or_overwrite(workspace, capsys, tmp_path):
    """A second `train` into the same --out is refused, naming what it would overwrite;
    --overwrite starts over (the log holds only the new run); --resume continues."""
    root, model = workspace
    out = tmp_path / "run"
    assert main(_train_args(root, model, out)) == 0
    capsys.readouterr()
    assert main(_train_args(root, model, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a training run (checkpoint.pt, log.jsonl" in err and "--overwrite" in err
    assert main(_train_args(root, model, out, "--resume", "--overwrite")) == 2
    assert "pass one" in capsys.readouterr().err
    assert main(_train_args(root, model, out, "--steps", "2", "--overwrite")) == 0
    assert [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert main(_train_args(root, model, out, "--steps", "2", "--resume")) == 0
