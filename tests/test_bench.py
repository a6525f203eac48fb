"""The benchmark harness runs and checks its baselines (timings are never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasoncache.bench import common, kernel

ROOT = Path(__file__).resolve().parent.parent


def test_flops_count_causal_pairs_exactly():
    # 3 queries, 3 own keys, causal: 1 + 2 + 3 own pairs, plus 3 * 2 prefix pairs.
    assert common.attention_pairs(1, 1, 3, 3, 2, causal=True) == 12
    # decode: 1 query sees all 5 own keys and the prefix.
    assert common.attention_pairs(2, 4, 1, 5, 3, causal=True) == 2 * 4 * 8
    assert common.flops(1, 1, 3, 3, 2, 8, True, "bwd") == 2.5 * 4 * 8 * 12


def test_kernel_bench_quick_cpu_writes_checked_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "QUICK_CPU", [kernel.Shape(1, 2, 1, 16, 3, 16, "fp32")])
    out = tmp_path / "k.json"
    kernel.main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and "git_commit" in data["environment"]
    timed = {r["method"]: r for r in data["rows"] if "skipped" not in r}
    assert {"reasoncache-torch", "sdpa-concat-lower-right", "sdpa-concat-mask"} <= set(timed)
    for r in timed.values():
        assert r["max_err"] < 1e-4 and r["fwd_ms"] > 0 and r["fwd+bwd_tflops"] > 0


def test_a_wrong_baseline_is_caught_before_timing(monkeypatch):
    monkeypatch.setitem(kernel.METHODS, "broken", lambda q, k, v, pk, pv, c: q * 0)
    tensors = kernel._inputs(kernel.Shape(1, 2, 1, 8, 2, 16, "fp32"), "cpu")
    with pytest.raises(AssertionError, match="broken disagrees with the reference"):
        kernel._check("broken", kernel.METHODS["broken"], tensors, kernel.Shape(1, 2, 1, 8, 2, 16, "fp32"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_decode_bench_checks_and_reports_cache_sizes():
    from reasoncache.bench import decode

    rows = decode.run_shape(decode.DecodeShape(3, 16, 8, 4, 2, 16, "fp32"), "cpu", ["torch", "triton"])
    by = {r["method"]: r for r in rows}
    for name in ("reasoncache-torch", "reasoncache-triton", "triton-per-sequence", "sdpa-copied-prefix"):  # interpreter
        assert by[name]["max_err"] < 1e-4 and by[name]["step_ms"] > 0
    # the shared prefix is stored once, the copied one per sequence
    assert by["reasoncache-torch"]["kv_cache_mb"] < by["sdpa-copied-prefix"]["kv_cache_mb"]
    icl = decode.icl_vs_reasoncache("cpu", "torch", quick=True)
    assert [r["B"] for r in icl] == [1, 8] and all(r["icl_ms"] > 0 and r["reasoncache_ms"] > 0 for r in icl)


def test_train_bench_runs_every_method_and_skips_with_reasons(monkeypatch):
    pytest.importorskip("peft")
    from reasoncache.bench import train

    monkeypatch.setitem(
        train.CONFIGS,
        "tiny",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        ),
    )
    rows = train.run("tiny", B=2, N=16, P=4, device="cpu", steps=1, methods=["reasoncache", "peft-prefix", "lora"])
    assert len(rows) == 6
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["method"], r["checkpointing"]) for r in skipped] == [("peft-prefix", True)]
    assert "gradient checkpointing" in skipped[0]["skipped"]
    timed = [r for r in rows if "skipped" not in r]
    assert all(r["tokens_per_s"] > 0 and r["trainable_params"] > 0 for r in timed)
    rc = next(r for r in timed if r["method"] == "reasoncache")
    assert rc["trainable_params"] == 2 * 2 * 2 * 4 * 16  # 2 layers x (k, v) x 2 kv heads x P=4 x D=16
    packed, padded = train.packing_rows("tiny", B=8, N=40, P=4, device="cpu", steps=1)[::-1]
    assert packed["layout"].startswith("packed") and padded["layout"] == "padded"
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-4)  # checked inside too
    assert packed["computed_tokens"] == packed["real_tokens"] < padded["computed_tokens"] == 8 * 40
    assert packed["real_tokens_per_s"] > 0 and packed["speedup_vs_padded"] > 0


def test_every_suite_runs_quick_on_cpu_and_writes_json_and_plots(tmp_path):
    """`reasoncache bench {kernel,decode,train} --quick --device cpu --out FILE`, as a user runs
    it (a subprocess without the test suite's TRITON_INTERPRET, outside the checkout, so it
    runs the installed package): CI's smoke test."""
    pytest.importorskip("peft")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for suite in ("kernel", "decode", "train"):
        out = tmp_path / f"{suite}.json"
        res = subprocess.run(
            [sys.executable, "-m", "reasoncache", "bench", suite, "--quick", "--device", "cpu", "--out", str(out)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        data = json.loads(out.read_text())
        assert data["rows"] and data["environment"]["device_type"] == "cpu"
    assert (tmp_path / "kernel_tflops_vs_n.png").is_file() and (tmp_path / "decode_speedup_vs_batch.png").is_file()


def test_reasoncache_bench_reaches_every_suite_and_names_them_for_an_unknown_one(capsys):
    """An installed user has no `bench/` folder: `reasoncache bench SUITE` must reach every suite
    `python -m bench` has (each answers --help with the command the user typed, not one they
    cannot run), and a wrong name gets the usage line, not a traceback."""
    from reasoncache.app import cli
    from reasoncache.bench.__main__ import SUITES

    for suite in SUITES:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["bench", suite, "--help"])
        assert exit_.value.code == 0 and f"usage: reasoncache bench {suite}" in capsys.readouterr().out
    assert cli.main(["bench", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "reasoncache bench" in err and "'bogus'" in err and all(s in err for s in SUITES)


def test_quality_table_aggregates_seeds_and_the_committed_study_has_three_per_variant():
    from reasoncache.bench import quality

    rows = [
        {"task": "t", "variant": "v", "config": {"kind": "prefix", "lr": 0.03}, "seed": s, "steps": 100,
         "trainable_params": 10, "loss_last10": loss, "accuracy": acc}
        for s, acc, loss in ((0, 0.5, 0.2), (1, 0.7, 0.4))
    ]  # fmt: skip
    line = quality.table(rows).splitlines()[-1]
    assert "| t (100 steps) | v | lr=0.03 | 10 | 2 | 0.600 ± 0.141 | 0.50-0.70 | 0.300 |" == line
    study = [json.loads(x) for x in (ROOT / quality.DEFAULT_OUT).read_text().splitlines() if x.strip()]
    per = {}
    for r in study:
        per.setdefault((r["task"], r["variant"]), set()).add(r["seed"])
        assert r["variant"] in quality.VARIANTS and 0 <= r["accuracy"] <= 1
    assert per and all(seeds == {0, 1, 2} for seeds in per.values())


def test_quality_suite_pairs_seeds_and_averages_every_task_at_the_shared_seeds():
    """The suite table pairs each seed's prefix run with the LoRA run of the same seed, skips
    runs of another length or test size, and averages every task at the seeds all tasks ran,
    so a task with extra seeds neither drops out nor weighs more."""
    from reasoncache.bench import quality

    def row(task, variant, seed, acc, steps=100, n=200):
        return {"task": task, "variant": variant, "seed": seed, "steps": steps, "n": n, "accuracy": acc}

    # the last row repeats a run: a run recorded twice counts once, the first
    rows = [row("a", "p", 0, 0.5), row("a", "p", 1, 0.7), row("a", "l", 0, 0.6), row("a", "l", 1, 0.6),
            row("b", "p", 0, 0.9), row("b", "l", 0, 0.8), row("b", "l", 1, 0.1, n=100),
            row("a", "p", 0, 0.0)]  # fmt: skip
    lines = quality.suite_table(rows, "p", "l").splitlines()
    assert lines[2] == "| a | 0,1 | 0.600 | 0.600 | -0.100 / +0.100 | +0.000 |"
    assert lines[3] == "| b | 0 | 0.900 | 0.800 | +0.100 | +0.100 |"
    # both tasks at seed 0, the only seed both ran: a's -0.1 and b's +0.1;
    # the standard error of the mean paired difference: sd(-0.1, +0.1) / sqrt(2) = 0.1
    assert lines[4] == (
        "| **mean of 2 tasks** | 0 each | **0.700** | **0.700** | worst task -0.100 | **+0.000** ± 0.100 (2 pairs) |"
    )
    # with b's seed 1 too, the mean covers both seeds of both tasks: pairs -0.1, +0.1, +0.1, +0.2,
    # sd 0.126, over sqrt(4)
    lines = quality.suite_table(rows + [row("b", "p", 1, 0.4), row("b", "l", 1, 0.2)], "p", "l").splitlines()
    assert lines[4] == (
        "| **mean of 2 tasks** | 0,1 each | **0.625** | **0.550** | worst task +0.000 | **+0.075** ± 0.063 (4 pairs) |"
    )
    # VARIANT@STEPS sets runs of another length beside --steps' runs; a bad label is refused
    longer = [row("a", "l", 0, 0.9, steps=200), row("b", "l", 0, 0.7, steps=200)]
    assert quality.suite_table(rows + longer, "p", "l@200").splitlines()[-1] == (
        "| **mean of 2 tasks** | 0 each | **0.700** | **0.800** | worst task -0.400 | **-0.100** ± 0.300 (2 pairs) |"
    )
    with pytest.raises(ValueError, match="VARIANT@STEPS"):
        quality.suite_table(rows, "p", "l@x")
    with pytest.raises(SystemExit):
        quality.main(["--suite", "p", "no-such-variant"])
    sweep = quality.sweep_table(rows + [row("a", "q", 0, 0.8)], ["p", "q"]).splitlines()
    assert sweep[2:] == [
        "| a | 0.500 | 0.800 |",
        "| b | 0.900 | - |",
        "| **mean of 1 task** | **0.500** | **0.800** (+0.300) |",
    ]


def test_first_wrong_step_locates_where_a_generation_leaves_the_worked_solution():
    """Steps are sentences plus the '#### answer' part; a wrong subtraction is step 2, a
    missing or altered final line is step 3, and the gold solution itself is past them all."""
    from reasoncache.app.tasks import make_split
    from reasoncache.bench import quality

    gold = "4 * 6 = 24. 24 - 9 = 15. #### 15"
    assert quality.solution_steps(gold) == ["4 * 6 = 24.", "24 - 9 = 15.", "#### 15"]
    assert quality.first_wrong_step("4 * 6 = 24. 24 - 9 = 13. #### 13", gold) == 2
    assert quality.first_wrong_step("4 * 6 = 30. 30 - 9 = 21. #### 21", gold) == 1
    assert quality.first_wrong_step("4 * 6 = 24. 24 - 9 = 15.", gold) == 3
    assert quality.first_wrong_step("4 * 6 = 24. 24 - 9 = 15. #### 15 pencils", gold) == 3
    assert quality.first_wrong_step(gold, gold) == 4
    for task in ("count_items", "day_of_week", "unit_conversion"):  # every family's solutions split into steps
        (ex,), _ = make_split(task, 1, 0, seed=1)
        parts = quality.solution_steps(ex.completion)
        assert parts[-1].startswith("####") and " ".join(parts) == ex.completion


def test_a_two_pass_variant_trains_and_tests_on_what_a_one_pass_run_of_half_the_steps_does():
    """The 2-epoch variants at 200 steps see 800 distinct examples twice, the batch-4 ones once:
    the same training and test examples as a 100-step one-pass run, so the two are paired on one test set; a step
    count whose examples do not divide into the passes is refused, naming --steps."""
    from reasoncache.bench import quality

    two = quality.split("two_quantities", "prefix-answers-2ep-lr3e-2", seed=1, steps=200, n_test=20)
    one = quality.split("two_quantities", "lora-lr5e-3", seed=1, steps=100, n_test=20)
    assert len(two[0]) == 800 and two == one
    assert quality.split("two_quantities", "prefix-answers-b4-lr3e-2", seed=1, steps=200, n_test=20) == one
    assert len(quality.split("two_quantities", "lora-lr5e-3", seed=1, steps=200, n_test=20)[0]) == 1600
    quality.VARIANTS["_three_passes"] = dict(kind="lora", lr=5e-3, epochs=3)
    try:
        with pytest.raises(SystemExit, match="--steps 100"):
            quality.split("two_quantities", "_three_passes", seed=1, steps=100)
    finally:
        del quality.VARIANTS["_three_passes"]


def test_gsm8k_rows_of_every_family_read_back_as_the_examples_they_were_written_from(tmp_path):
    """The CLI variant trains on a split written as GSM8K rows: the calculator notes it adds must
    come off again, leaving each example's prompt, worked answer and answer unchanged."""
    from reasoncache.app.data import load_jsonl
    from reasoncache.app.tasks import TASKS, make_split
    from reasoncache.bench import quality

    noted = 0
    for task in sorted(TASKS):
        examples, _ = make_split(task, 20, 0, seed=4)
        rows = [quality.gsm8k_row(e) for e in examples]
        noted += sum("<<" in r["answer"] for r in rows)
        f = tmp_path / f"{task}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        back = load_jsonl(f)
        assert [(e.prompt, e.completion, e.answer) for e in back] == [
            (e.prompt, e.completion, e.answer) for e in examples
        ]
    assert noted > 100  # the notes are there to be removed
    assert quality.gsm8k_row(make_split("next_in_sequence", 1, 0, seed=0)[0][0])["answer"].count("<<") == 2


def test_the_cli_variant_trains_and_evaluates_through_the_commands_a_user_runs(tmp_path, monkeypatch):
    """``prefix-cli-defaults`` runs `reasoncache train` and `reasoncache eval` in subprocesses on
    the run's split (here a tiny model, 2 steps, 3 test rows) and returns a row like run_one's."""
    from reasoncache.app.data import load_jsonl
    from reasoncache.bench import quality
    from tiny_models import save_tiny

    monkeypatch.setattr(quality.tempfile, "gettempdir", lambda: str(tmp_path))
    model = save_tiny(tmp_path / "model")
    row = quality.run_cli(
        "next_in_sequence", "prefix-cli-defaults", 1, steps=2, evaluate_test=True, model_path=model, n_test=3
    )
    assert row["n"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["trainable_params"] > 0 and row["steps"] == 2
    train, _ = quality.split("next_in_sequence", "prefix-cli-defaults", 1, 2, 3)
    folder = quality.run_dir("next_in_sequence", "prefix-cli-defaults", 1, 2)
    assert [e.completion for e in load_jsonl(folder / "train.jsonl")] == [e.completion for e in train]
    assert len(train) == 8  # 2 steps of the CLI's batch of 4, seen once
    log = [json.loads(x) for x in (folder / "run" / "log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == 2


def test_position_dropout_drops_prefix_positions_only_while_training():
    """The bench-only position dropout keeps position 0 and drops others at about its rate in
    training mode; in eval mode, and in the patched model's eval forward, the whole prefix."""
    import reasoncache
    from reasoncache.bench import quality
    from tiny_models import tiny_model

    model = tiny_model("llama")
    cache = reasoncache.ReasonCache.for_model(model, prefix_len=40)
    k0, _ = cache.layer(0)
    quality.with_position_dropout(cache, 0.25)
    reasoncache.patch(model, cache)
    model.train()
    torch.manual_seed(0)
    kept = [cache.layer(0)[0] for _ in range(50)]
    assert all(torch.equal(k[:, 0], k0[:, 0]) for k in kept)  # position 0 is always there
    share = sum(k.shape[1] - 1 for k in kept) / (50 * 39)
    assert 0.65 < share < 0.85  # about 1 - 0.25 of the others
    model.eval()
    assert torch.equal(cache.layer(0)[0], k0)
    ids = torch.randint(3, 100, (1, 6))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert 0 < int((cache.keys.grad[0].abs().sum((0, 2)) > 0).sum()) < 40  # dropped positions get no gradient


def test_a_diverged_run_is_a_row_and_the_rest_of_the_queue_runs(tmp_path, monkeypatch, capsys):
    """The first run of two diverges (its loss made NaN): it is recorded as a diverged row, the
    second still runs, the table counts the divergence beside the seeds, and running the same
    command again runs neither."""
    from helpers import poison_step
    from reasoncache.bench import quality
    from tiny_models import save_tiny

    monkeypatch.setattr(quality.tempfile, "gettempdir", lambda: str(tmp_path))
    model, out = save_tiny(tmp_path / "model"), tmp_path / "rows.jsonl"
    argv = ["--task", "arithmetic", "--variants", "prefix-answers-b4-lr3e-2", "prefix-answers-b4-p24x8-lr3e-2",
            "--seeds", "0", "--steps", "2", "--no-eval", "--model", model, "--out", str(out)]  # fmt: skip
    poison_step(monkeypatch, at=2)  # the first run's second step
    quality.main(argv)
    first, second = [json.loads(x) for x in out.read_text().splitlines()]
    assert first["variant"] == "prefix-answers-b4-lr3e-2" and "training diverged at step 2 of 2" in first["diverged"]
    assert "diverged" not in second and second["loss_last10"] > 0
    assert "| 0 (1 diverged) | - | - | - |" in quality.table([first, second])
    capsys.readouterr()
    quality.main(argv)
    assert len(out.read_text().splitlines()) == 2 and capsys.readouterr().out == ""


def test_the_cli_variant_reports_a_diverged_train_as_divergence(tmp_path, monkeypatch):
    """`reasoncache train` exiting 1 (its status for a diverged run) becomes TrainingDiverged
    with the command's last stderr line, which the queue records as a row."""
    import subprocess

    from reasoncache.app.trainer import TrainingDiverged
    from reasoncache.bench import quality

    def diverging(cmd, stdout, stderr, text):
        stderr.write("reasoncache train: error: training diverged at step 3 of 8: the loss is nan ...\n")
        return subprocess.CompletedProcess(cmd, 1, "")

    monkeypatch.setattr(quality.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(subprocess, "run", diverging)
    with pytest.raises(TrainingDiverged, match="training diverged at step 3 of 8"):
        quality.run_cli("next_in_sequence", "prefix-cli-defaults", 0, steps=2, evaluate_test=True, n_test=3)


def test_generate_bench_times_exactly_the_asked_tokens_and_names_a_bad_argument(capsys):
    """bench generate forces the number of new tokens (an early end-of-sequence would time a
    shorter run), and refuses a non-positive count naming the flag, before loading a model."""
    from reasoncache.bench import generate
    from tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 7, 9]])
    assert generate._best_s(model, ids, 5, reps=2) > 0
    with pytest.raises(SystemExit):
        generate.main(["--new-tokens", "0"])
    assert "--new-tokens must be >= 1, got 0" in capsys.readouterr().err


QUALITY = ["--task", "arithmetic", "--variants", "lora-b4-lr5e-3"]


@pytest.mark.parametrize(
    "suite, argv, msg",
    [
        ("quality", [*QUALITY, "--steps", "0"], "--steps must be >= 1, got 0"),
        ("quality", [*QUALITY, "--n-test", "0"], "--n-test must be >= 1, got 0"),
        ("quality", [*QUALITY, "--seeds", "0", "-2"], "--seeds must be >= 0, got -2"),
        ("train", ["--quick", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("train", ["--quick", "--seq-len", "-3"], "--seq-len must be >= 1, got -3"),
        ("train", ["--quick", "--methods", "reasoncache,nope"], "--methods: unknown ['nope']"),
        ("generate", ["--threads", "0"], "--threads must be >= 1, got 0"),
        ("audit", ["--workers", "0"], "--workers must be >= 1, got 0"),
    ],
    ids=str,
)
def test_bench_names_a_bad_count_before_any_run(suite, argv, msg, capsys):
    """A count below 1 is a usage error naming the flag, before anything loads or runs (`quality
    --steps 0` once surfaced as "the training data has only 0 tokens", `train --batch-size 0`
    ran the default batch, `generate --threads 0` was torch's traceback)."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"reasoncache.bench.{suite}").main(argv)
    assert msg in capsys.readouterr().err


def test_bench_without_the_demo_extra_says_which_package_is_missing(tmp_path, monkeypatch, capsys):
    """Without matplotlib a plot is skipped with one line naming it; without peft, `bench
    train` refuses the PEFT and LoRA baselines with a message saying how to get them."""
    from reasoncache.bench import train

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    rows = [{"n": 1, "t": 1.0, "m": "a"}, {"n": 2, "t": 2.0, "m": "a"}]
    common.plot_lines(rows, "n", "t", "m", tmp_path / "p.png", "title", "x", "y")
    assert "matplotlib draws it (pip install 'reasoncache[demo]')" in capsys.readouterr().out
    assert not (tmp_path / "p.png").exists()

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SystemExit):
        train.main(["--quick", "--device", "cpu"])
    assert "need peft: pip install 'reasoncache[demo]'" in capsys.readouterr().err


def test_a_wrong_method_is_recorded_and_the_run_goes_on(monkeypatch):
    """On a GPU a never-run kernel may be wrong: the benchmark records it and times the rest."""
    monkeypatch.setitem(kernel.METHODS, "broken", lambda q, k, v, pk, pv, c: q * 0)
    rows = kernel.run_shape(kernel.Shape(1, 2, 1, 16, 2, 16, "fp32"), "cpu", ["broken", "sdpa-concat-mask"])
    assert "disagrees with the reference" in rows[0]["failed"]
    assert rows[1]["fwd+bwd_ms"] > 0


def test_smoke_stage_records_a_failed_item_and_runs_the_next(tmp_path, monkeypatch):
    from reasoncache.bench import smoke

    out = tmp_path / "smoke.json"
    assert smoke.main(["--device", "cpu", "--backend", "torch", "--out", str(out)]) == 0
    items = json.loads(out.read_text())["rows"]
    assert [i["item"] for i in items][:3] == ["errors", "odd", "decode-before-prefill"]
    assert all(i["status"] == "ok" for i in items)
    assert max(v for r in items[1]["rows"] for k, v in r.items() if k.startswith("err_")) < 1e-5

    def broken(*a):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(smoke, "timed_padding_window", broken)
    assert (
        smoke.main(["--device", "cpu", "--backend", "torch", "--out", str(out), "--only", "d64-padding-window", "d256"])
        == 1
    )
    items = json.loads(out.read_text())["rows"]
    assert [(i["item"], i["status"]) for i in items] == [("d64-padding-window", "failed"), ("d256", "ok")]
    assert "illegal memory access" in items[0]["rows"][0]["error"]


def test_the_study_s_per_layer_spreads_spend_the_default_budget():
    """The study's layouts at one parameter budget (P=32 on half the layers, uneven spreads)
    give ``prefix_len`` per layer: each spends the default's 480 positions over SmolLM2's 30
    layers (P=16 on each), so it is compared at equal parameters."""
    from reasoncache.bench import quality
    from reasoncache.cache import per_layer_lengths

    budget = quality.STUDY_PREFIX_LEN * 30
    spreads = {n: v["prefix_len"] for n, v in quality.VARIANTS.items() if not isinstance(v.get("prefix_len", 0), int)}
    assert {"prefix-answers-b4-p32alt-lr3e-2", "prefix-answers-b4-p24x8-lr3e-2"} <= set(spreads)
    for name, spec in spreads.items():
        assert sum(per_layer_lengths(spec, 30)) == budget, name
    assert per_layer_lengths(spreads["prefix-answers-b4-p32upper-lr3e-2"], 30)[14:16] == (0, 32)


def test_the_bench_only_inits_are_the_tails_they_claim():
    """``bench_init_cache``: "context" is the last ``P`` tokens of ``CONTEXT_SHOTS`` shuffled
    demonstrations computed with all of them in context; "context-first" replaces position 0 by
    the sequence's first token computed alone (its values, which see only itself, match a lone
    token's wherever it sits); "answers-nofirst" is the answers init's ``P + 1`` tokens without
    the first."""
    import random

    from reasoncache import ReasonCache
    from reasoncache.app.tasks import make_split
    from reasoncache.bench import quality
    from tiny_models import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 12, 0)
    order = list(train)
    random.Random(3).shuffle(order)
    demos = [tok(f"{e.prompt}\n{e.completion}\n\n", add_special_tokens=False).input_ids for e in order[:8]]
    assert quality.CONTEXT_SHOTS == 8
    ids = torch.tensor([[i for d in demos for i in d]])
    cache = quality.bench_init_cache(model, tok, train, (8, 3), "context", seed=3)
    want = ReasonCache.from_demonstrations(model, ids, layer_lengths=cache.layer_lengths, keep_last=8)
    assert cache.layer_lengths[:2] == (8, 3)
    assert torch.equal(cache.keys, want.keys) and torch.equal(cache.values, want.values)
    first = quality.bench_init_cache(model, tok, train, (8, 3), "context-first", seed=3)
    assert torch.equal(first.keys[:, :, 1:], cache.keys[:, :, 1:])
    lone = ReasonCache.from_demonstrations(model, ids[:, :1])
    torch.testing.assert_close(first.values[:, :, :1], lone.values, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first.values[:, :, :1], cache.values[:, :, :1])
    answers = tok(f"{order[0].completion}\n\n", add_special_tokens=False).input_ids
    assert len(answers) > 8  # one answer is long enough here
    nofirst = quality.bench_init_cache(model, tok, train, (8, 3), "answers-nofirst", seed=3)
    want = ReasonCache.from_demonstrations(
        model, torch.tensor([answers[:9]]), layer_lengths=nofirst.layer_lengths, keep_last=8
    )
    assert torch.equal(nofirst.keys, want.keys) and torch.equal(nofirst.values, want.values)
