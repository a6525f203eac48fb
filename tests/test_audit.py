"""The static GPU audit (`python -m bench audit`) and the Triton tuning rules it checks:
compiled for sm_90 and sm_80 on this CPU machine, no GPU involved."""

import os
import subprocess
import sys

import pytest
import torch

from reasoncache.bench import audit
from reasoncache.kernels import utils


def test_sass_counts_reads_predicated_and_suffixed_opcodes():
    sass = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0110*/              @P0  LDSM.16.M88.4 R4, [R2] ;
        /*0120*/             @!P1  LD.E.128 R8, desc[UR6][R6.64] ;
        /*0130*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR8][R10.64] ;
        /*0140*/                   LDG.E R12, desc[UR4][R2.64] ;
        /*0150*/                   HMMA.16816.F32.BF16 R20, R4, R8, R20 ;
    """
    c = audit.sass_counts(sass)
    assert c == {"HGMMA": 1, "HMMA": 1, "LDSM": 1, "LDGSTS": 1, "UTMALDG": 0, "LD.E": 1}


def test_loop_spill_ops_counts_only_spills_between_a_backward_branch_and_its_target():
    nvdisasm = """
        /*0010*/                   STL [R1+0x4], R9 ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R20, R4, R8, R20 ;
        /*0030*/                   LDL R3, [R1+0x8] ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/               @P2 BRA `(.L_x_2) ;
        /*0060*/                   STL [R1+0xc], R0 ;
.L_x_2:
        /*0070*/                   LDL.LU R10, [R1+0x4] ;
    """
    assert audit.loop_spill_ops(nvdisasm) == 1  # the forward branch to .L_x_2 makes no loop
    cuobjdump = """
        /*0100*/                   STL [R1], R2 ;
        /*0110*/                   LDL R5, [R1] ;
        /*0120*/              @!P0 BRA 0x100 ;
        /*0130*/                   LDL R6, [R1] ;
    """
    assert audit.loop_spill_ops(cuobjdump) == 2


def test_signature_specialises_like_a_real_launch():
    from reasoncache.kernels import fwd

    sig, const, attrs = audit._signature(fwd._fwd_kernel, "bf16", {"BLOCK_M": 64}, audit._FP32_POINTERS)
    names = fwd._fwd_kernel.arg_names
    assert sig["Q"] == "*bf16" and sig["Lse"] == "*fp32" and sig["KPM"] == "*u8" and sig["qk_scale"] == "fp32"
    assert const["stride_qd"] == 1 and const["stride_lm"] == 1 and sig["stride_qd"] == "constexpr"
    assert attrs[(names.index("stride_qm"),)] == [["tt.divisibility", 16]]
    assert (names.index("stride_lh"),) not in attrs  # lse strides carry Nq: no alignment promise
    assert sig["TUNE_ROWS"] == "i32" and sig["BLOCK_M"] == "constexpr"


def test_every_space_has_a_tile_for_every_head_dim_and_architecture():
    for space in (utils.FWD_SPACE, utils.DKDV_SPACE, utils.DQ_SPACE):
        for major in (8, 9, 12):  # 12 (Blackwell consumer cards) uses sm_80's table
            for d in (16, 32, 64, 128, 256):
                assert any(t.allows(major, d) for t in space), (space, major, d)


def test_tune_buckets_are_coarse():
    assert [utils.tune_bucket(n) for n in (0, 1, 16, 17, 64, 65, 300, 1024, 5000, 10**6)] == [
        0, 16, 16, 64, 64, 256, 1024, 1024, 4096, 4096
    ]  # fmt: skip


def test_pruner_keeps_what_fits_the_device_and_the_shape(monkeypatch):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    cfgs = [t.config() for t in utils.FWD_SPACE]
    prune = utils.pruner(utils.FWD_SPACE, "BLOCK_M", lambda a, kw: a["N_Q"] * kw["GROUP"])
    q = torch.empty(0)

    def kept(major, n_q, group, block_d):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        out = prune(cfgs, {"Q": q, "N_Q": n_q}, GROUP=group, BLOCK_D=block_d)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in out}

    assert kept(9, 1, 4, 128) == {(16, 64, 4, 2)}  # decode: 4 rows, nothing larger than 16
    big = kept(9, 4096, 4, 128)
    assert (128, 64, 8, 3) in big and (128, 128, 8, 3) not in big  # the headline tile spills at D = 128
    assert (128, 128, 8, 3) in kept(9, 4096, 4, 64)
    assert kept(9, 4096, 4, 256) <= {(128, 32, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)}
    assert (128, 64, 8, 3) not in kept(8, 4096, 4, 128)  # spills on sm_80
    assert kept(8, 20, 1, 128) == {(32, 32, 4, 2), (16, 64, 4, 2)}  # 20 rows: tiles of at most 32


def test_prefix_gradient_is_bitwise_identical_across_processes():
    """Its tile is fixed (never autotuned) and its split count depends on the shape and the
    device only, so two processes sum the batch in the same order."""
    code = (
        "import torch, reasoncache\n"
        "torch.manual_seed(0)\n"
        "q = torch.randn(3, 4, 21, 32, requires_grad=True); k = torch.randn(3, 2, 21, 32); v = torch.randn_like(k)\n"
        "pk = torch.randn(2, 19, 32, requires_grad=True); pv = torch.randn(2, 19, 32, requires_grad=True)\n"
        "reasoncache.prefix_attention(q, k, v, pk, pv, backend='triton').square().sum().backward()\n"
        "print(torch.cat([pk.grad.flatten(), pv.grad.flatten()]).view(torch.int32).sum().item())\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # fmt: skip
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()


@pytest.mark.skipif(not audit._tools().joinpath("cuobjdump").is_file(), reason="Triton ships no cuobjdump here")
def test_static_audit_passes():
    """Every tile the kernels can choose, compiled for sm_90 and sm_80: no spills, shared
    memory within the target, wgmma in the sm_90 forward, 64-bit batch offsets; the CUDA
    extension's kernels read from its cubins. Only findings an open issue names may remain."""
    from reasoncache.ops import backends

    try:
        backends.cuda_extension()
        extra = []
    except ImportError:
        extra = ["--no-cuda"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "reasoncache.bench", "audit", "--check", *extra],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "New findings: 0" in res.stdout


def test_audit_report_goes_into_a_folder_it_creates(tmp_path, monkeypatch):
    """--out into a folder that does not exist yet is made up front, not found missing after
    minutes of compiling."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(audit, "triton_rows", lambda *a, **k: [])
    out = tmp_path / "new" / "static_audit.md"
    assert audit.main(["--no-cuda", "--check", "--out", str(out)]) == 0
    assert "New findings: 0" in out.read_text() and out.with_suffix(".json").is_file()
