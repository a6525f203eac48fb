"""The benchmark harness runs and checks its baselines (timings are never asserted)."""

import json

import pytest

from bench import common, kernel


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
