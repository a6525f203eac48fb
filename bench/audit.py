"""``python -m bench audit``: a static GPU audit that needs no GPU.

Triton: every kernel at every autotune configuration it can choose is compiled for
``GPUTarget("cuda", 90, 32)`` (H100/H200) and ``("cuda", 80, 32)`` (A100) with the
specialisations a real launch gets (16-byte aligned pointers, unit innermost strides),
then its cubin is read with the ``cuobjdump``/``nvdisasm`` that Triton ships: registers,
spilled bytes, shared memory, and the tensor-core and load instructions in its SASS
(``HGMMA`` = wgmma, ``HMMA`` = mma.sync, ``LDSM`` = ldmatrix, ``LDGSTS`` = cp.async,
``UTMALDG`` = TMA).

CUDA: the built ``reasoncache._C`` carries cubins for every architecture in its build;
the same tools read each kernel's registers, spills and SASS, and the extension reports
the dynamic shared memory each kernel asks for, checked against every architecture's
per-block opt-in limit.

``--check`` exits 1 on a finding: a spill inside a loop (an ``STL``/``LDL`` between a
backward branch and its target; a value parked once before the key loop and reloaded after
it is reported in the table but costs one store and one load per thread) or shared memory
over its target's limit in a configuration the kernels can choose, a hot Triton kernel on
sm_90 without wgmma at a tile that allows it, or a bf16 CUDA kernel whose fragment loads
are not ldmatrix. Findings that an open issue already names are listed in ``KNOWN`` and
reported as known rather than failing. Nothing here measures speed: that needs the GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import check_counts, environment, write_json

# Per-block shared memory opt-in limits (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SMEM_OPTIN = {
    "sm_80 (A100)": 166912,
    "sm_86/89/120 (A10, L4, L40, RTX 30/40/50)": 101376,
    "sm_90 (H100/H200)": 232448,
}
TARGET_LIMIT = {90: SMEM_OPTIN["sm_90 (H100/H200)"], 80: SMEM_OPTIN["sm_80 (A100)"]}

# Findings an open issue already names: (backend, rule) -> why it is not failing CI yet.
KNOWN: dict[tuple[str, str], str] = {}


def _tools() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?")
COUNTED = ("HGMMA", "HMMA", "LDSM", "LDGSTS", "UTMALDG", "LD.E")


def sass_counts(sass: str) -> dict[str, int]:
    """How often each instruction of ``COUNTED`` appears (``LD.E``: generic loads)."""
    ops = collections.Counter()
    for m in _OP.finditer(sass):
        op, suffix = m.group(1), m.group(2) or ""
        ops[op] += 1
        if op == "LD" and suffix.startswith(".E"):
            ops["LD.E"] += 1
    return {k: ops[k] for k in COUNTED}


_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))")


def loop_spill_ops(sass: str) -> int:
    """How many local-memory spill instructions (``STL``/``LDL``) lie inside a loop of one
    function's SASS: a loop is the address range from a backward branch's target to the
    branch. Spills outside every loop (a value parked before the key loop and reloaded after
    it) run once per thread; those inside run every trip and are what costs. Reads both
    nvdisasm's labelled form and cuobjdump's hex branch targets."""
    labels, insts, pending = {}, [], []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _ADDR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        insts.append((addr, m.group(2)))
    loops = []
    for addr, text in insts:
        b = _BRANCH.search(text)
        if b:
            target = labels.get(b.group(1)) if b.group(1) else int(b.group(2), 16)
            if target is not None and target <= addr:
                loops.append((target, addr))
    spills = [a for a, text in insts if re.match(r"(?:@!?U?P[T0-9]+\s+)?(?:STL|LDL)\b", text)]
    return sum(any(lo <= a <= hi for lo, hi in loops) for a in spills)


def resource_usage(path: str) -> dict[str, dict]:
    """{(arch, function): {regs, spill_bytes}} from ``cuobjdump -res-usage`` (spills: the
    stack frame plus local memory, in bytes per thread)."""
    out = {}
    # cuobjdump prints one "arch = sm_XX" header per embedded cubin, then its functions.
    for block in re.split(r"(?=arch = sm_\d+)", _run(str(_tools() / "cuobjdump"), "-res-usage", path)):
        m = re.match(r"arch = (sm_\d+)", block)
        arch = m.group(1) if m else None
        for f, reg, stack, _shared, local in _RES.findall(block):
            out[(arch, f)] = {"regs": int(reg), "spill_bytes": int(stack) + int(local)}
    return out


# ------------------------------------------------------------------ Triton
@dataclass
class Row:
    """One compiled kernel's static numbers: registers, spills, shared memory and SASS opcode counts."""

    backend: str
    kernel: str
    target: str
    dtype: str
    head_dim: int
    config: str
    regs: int
    spill_bytes: int
    smem_bytes: int
    sass: dict = field(default_factory=dict)
    loop_spill_ops: int = 0  # STL/LDL inside a loop of the SASS (see loop_spill_ops)
    compile_s: float = 0.0
    i64_offsets: bool | None = None  # Triton: batch offsets multiplied in 64 bits (read from the TTIR)
    findings: list = field(default_factory=list)


_FP32_POINTERS = {"Lse", "Delta", "DLse", "DPK", "DPV", "OInit", "LInit", "OP", "LP", "SplitO", "SplitL"}
_INT_ARGS = {"H_KV", "N_Q", "N_K", "P", "WINDOW", "B", "SPLITS", "H", "TUNE_ROWS", "TUNE_NK", "TUNE_P",
             "INIT_SPLITS", "ROWS", "BLOCKS_PER_SPLIT", "KV_CHUNK"}  # fmt: skip
_FLOAT_ARGS = {"qk_scale", "sm_scale"}


def _signature(fn, dtype: str, constexprs: dict, fp32_pointers: set[str]):
    """The signature, constants and alignment attributes a real launch would specialise to:
    16-byte aligned pointers, innermost strides equal to 1, other strides of q/k/v/out
    multiples of 16 elements (D is); lse and mask strides with no such promise."""
    sig, attrs, const = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in const:
            continue
        if name in _INT_ARGS:
            sig[name] = "i32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name.startswith("stride_"):
            if name.endswith("d") or name in ("stride_mn", "stride_lm", "stride_jm", "stride_tm"):
                const[name] = 1
                continue
            sig[name] = "i32"
            if not name.startswith(("stride_l", "stride_m", "stride_j", "stride_t")):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # a tensor pointer
            typed = {"KPM": "*u8", "Tickets": "*i32"}
            sig[name] = typed.get(name) or ("*fp32" if name in fp32_pointers else f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in const:
        sig[name] = "constexpr"
    return sig, const, attrs


def triton_kernels():
    """{name: (jit function, extra constexprs)} for every Triton kernel the op launches."""
    from reasoncache.kernels import bwd, fwd

    causal = dict(IS_CAUSAL=True, HAS_WINDOW=False, HAS_KPM=False)
    prefill = dict(causal, SCALE_POSITIVE=True, HAS_INIT=False, SPLIT_KV=False, TMA_MIN_ROWS=fwd.TMA_MIN_ROWS)
    return {
        "fwd": (fwd._fwd_kernel, dict(prefill, USE_TMA=False)),
        # the interior K/V tiles through TMA descriptors (REASONCACHE_TRITON_TMA=1; sm_90 only)
        "fwd tma": (fwd._fwd_kernel, dict(prefill, USE_TMA=True)),
        # decode: the own-key pass that merges the prefix pass's partials, split over own keys
        "fwd decode own keys": (fwd._fwd_kernel, dict(prefill, HAS_INIT=True, SPLIT_KV=True, USE_TMA=False)),
        "fwd prefix pass": (fwd._prefix_pass_kernel, dict(SCALE_POSITIVE=True)),
        "bwd dk/dv": (bwd._bwd_dkdv_kernel, causal),
        "bwd dq": (bwd._bwd_dq_kernel, causal),
        "bwd dprefix": (bwd._bwd_dprefix_kernel, {}),
    }


def choosable(archs) -> list[tuple]:
    """Every (kernel, tile, head dim, arch) the kernels can run: each autotune space's tiles
    at the head dims and architectures where ``Tile.fits`` admits them (so the device-side
    pruning; the forward's space also serves the shared-prefix pass, whose tile is picked
    from it by rule), and the prefix-gradient kernel's fixed tile at every head dim."""
    from reasoncache.kernels import utils
    from reasoncache.kernels.fwd import SHARED_PREFIX_MAX_ROWS, TMA_MIN_ROWS

    out = []
    fwd = utils.FWD_SPACE
    spaces = [("fwd", fwd), ("fwd tma", fwd), ("fwd decode own keys", fwd), ("fwd prefix pass", fwd),
              ("bwd dk/dv", utils.DKDV_SPACE), ("bwd dq", utils.DQ_SPACE)]  # fmt: skip
    for name, space in spaces:
        for t in space:
            if name == "fwd tma":  # sm_90's wgmma tiles: the only ones that take the descriptor path
                out += [(name, t, D, 90) for D in t.fits.get(9, ()) if 90 in archs and t.block_m >= TMA_MIN_ROWS]
                continue
            if name == "fwd decode own keys" and t.block_m > SHARED_PREFIX_MAX_ROWS:
                continue  # the pass runs only for that many rows per sequence, and the pruner follows the rows
            out += [(name, t, D, arch) for arch in archs for D in t.fits.get(arch // 10, ())]
    for D in utils._ALL:
        t = utils.dprefix_tile(D)
        out += [("bwd dprefix", t, D, arch) for arch in archs if D in t.fits.get(arch // 10, ())]
    return out


def _compile_triton(job: tuple) -> dict:
    """Compile one (kernel, tile, dtype, head dim, arch) and read its cubin. Runs in a worker."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kname, (bm, bn, warps, stages), dtype, D, arch, group = job
    fn, extra = triton_kernels()[kname]
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, GROUP=group, HEAD_DIM=D, BLOCK_D=D, DOT_PRECISION="tf32", **extra)
    sig, const, attrs = _signature(fn, dtype, constexprs, _FP32_POINTERS)
    t0 = time.time()
    k = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    secs = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        usage = next(iter(resource_usage(f.name).values()))
        text = _run(str(_tools() / "nvdisasm"), "-c", f.name)
        sass, in_loops = sass_counts(text), loop_spill_ops(text)
    finally:
        os.unlink(f.name)
    i64 = bool(re.search(r"arith\.muli [^\n]*: (?:tensor<[^>\n]*x)?i64\b", k.asm["ttir"]))
    return asdict(Row("triton", kname, f"sm_{arch}", dtype, D, f"{bm}x{bn} w{warps} s{stages}", usage["regs"],
                      usage["spill_bytes"], k.metadata.shared, sass, in_loops, round(secs, 1), i64))  # fmt: skip


def triton_rows(archs, dtypes, group: int = 4, workers: int = 2) -> list[dict]:
    """Compile every Triton tile the autotuner can pick for ``archs`` x ``dtypes`` (in ``workers``
    processes) and return one row of static numbers each."""
    jobs = [
        (name, (t.block_m, t.block_n, t.warps, t.stages), dtype, D, arch, group)
        for name, t, D, arch in choosable(archs)
        for dtype in dtypes
    ]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_triton, jobs))


def triton_findings(row: dict) -> list[str]:
    """What is wrong with one Triton row (spills in a loop, shared memory over the target's
    limit, no wgmma on sm_90, no TMA load in the TMA kernel, 32-bit batch offsets), one line each; empty when clean."""
    found = []
    limit = TARGET_LIMIT[int(row["target"][3:])]
    if row["loop_spill_ops"]:
        found.append(f"spills {row['spill_bytes']} B, {row['loop_spill_ops']} STL/LDL inside a loop")
    if row["smem_bytes"] > limit:
        found.append(f"shared {row['smem_bytes'] / 1024:.0f} KiB > {limit / 1024:.0f} KiB")
    block_m = int(row["config"].split("x")[0])
    if row["target"] == "sm_90" and row["kernel"].startswith("fwd") and block_m >= 64 and not row["sass"]["HGMMA"]:
        found.append("no wgmma on sm_90")
    if row["kernel"] == "fwd tma" and not row["sass"]["UTMALDG"]:
        found.append("no TMA load (UTMALDG)")
    if row["i64_offsets"] is False:
        found.append("32-bit batch offsets")
    return found


# ------------------------------------------------------------------ CUDA
def cuda_rows() -> list[dict]:
    """One row per kernel instantiation and architecture in the built reasoncache._C."""
    from reasoncache.ops.backends import cuda_extension

    C = cuda_extension()
    path = C.__file__
    usage = resource_usage(path)
    sass_by = {}
    for block in re.split(r"(?=\n\s*arch = sm_\d+)", _run(str(_tools() / "cuobjdump"), "-sass", path)):
        m = re.search(r"arch = (sm_\d+)", block)
        if not m:
            continue
        for fn_block in re.split(r"\n\s*Function : ", block)[1:]:
            name = fn_block.split("\n", 1)[0].strip()
            sass_by[(m.group(1), name)] = (sass_counts(fn_block), loop_spill_ops(fn_block))
    names = {f: _run("c++filt", f).strip() for _, f in usage}
    rows = []
    for (arch, f), u in sorted(usage.items()):
        pretty = names[f]
        m = re.search(r"reasoncache::(\w+)<([^>]*)>", pretty)
        if not m:
            continue
        kernel, targs = m.group(1), [a.strip() for a in m.group(2).split(",")]
        bf16 = targs[0] == "__nv_bfloat16"
        D = int(next((a for a in targs if a.isdigit()), 0))  # 0: an elementwise kernel (dq_finish)
        smem = C.smem_bytes("fwd" if kernel == "attend_kernel" else "bwd", bf16, D) if D else 0
        cfg = kernel.replace("_kernel", "") + ("<" + ",".join(targs[1:]) + ">" if len(targs) > 1 else "")
        warps = int(targs[3]) if kernel == "attend_kernel" else 4  # decode's small problems get 1-warp tiles
        tile = f"{16 * warps}-row tiles, {warps} warp{'s' if warps > 1 else ''}" if D else "elementwise"
        if warps == 1:  # smem_bytes reports the 64-row tile's; the 16-row tile's Q tile is a quarter
            smem -= 48 * D * 2
        rows.append(
            asdict(Row("cuda", cfg, arch, "bf16" if bf16 else "fp16", D, tile, u["regs"],
                       u["spill_bytes"], smem, *sass_by.get((arch, f), ({}, 0))))
        )  # fmt: skip
    return rows


def cuda_findings(row: dict) -> list[str]:
    """What is wrong with one CUDA row (spills in a loop, bf16 fragments loaded without
    LDSM), one line each;
    empty when clean."""
    found = []
    if row["loop_spill_ops"]:
        found.append(f"spills {row['spill_bytes']} B, {row['loop_spill_ops']} STL/LDL inside a loop")
    if row["dtype"] == "bf16" and row["sass"].get("HMMA") and not row["sass"].get("LDSM"):
        found.append("bf16 fragment loads without LDSM")
    return found


def cuda_launch_limits(rows: list[dict]) -> list[str]:
    """Which architectures the CUDA backend refuses for lack of shared memory (it checks
    sharedMemPerBlockOptin before launching, so these are refusals, not crashes)."""
    need = {}
    for r in rows:
        if not r["head_dim"]:  # an elementwise kernel (no shared memory)
            continue
        key = (r["dtype"], r["head_dim"])
        need[key] = max(need.get(key, 0), r["smem_bytes"])
    lines = []
    for (dtype, D), n in sorted(need.items()):
        refused = [a for a, lim in SMEM_OPTIN.items() if n > lim]
        lines.append(
            f"- {dtype} D={D}: {n / 1024:.2f} KiB per block; "
            + (f"refused on {', '.join(refused)}" if refused else "fits every sm_80+ architecture")
        )
    return lines


# ------------------------------------------------------------------ report
COLUMNS = ("backend", "kernel", "target", "dtype", "D", "config", "regs", "spill B", "in loops", "smem KiB") + COUNTED


def render(rows: list[dict]) -> str:
    """The audit's rows as a Markdown table with a findings column."""
    lines = ["| " + " | ".join(COLUMNS) + " | findings |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [
            r["backend"],
            r["kernel"],
            r["target"],
            r["dtype"],
            str(r["head_dim"]),
            r["config"],
            str(r["regs"]),
            str(r["spill_bytes"]),
            str(r.get("loop_spill_ops", 0)),
            f"{r['smem_bytes'] / 1024:.1f}",
        ] + [str(r["sass"].get(k, 0)) for k in COUNTED]
        cells.append("; ".join(r["findings"]) or "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m bench audit") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=[80, 90], help="Triton targets")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension (e.g. not built)")
    ap.add_argument("--workers", type=int, default=2, help="parallel Triton compiles")
    ap.add_argument("--out", help="write the markdown report here (and the rows as JSON beside it)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a finding not listed in KNOWN")
    args = ap.parse_args(argv)
    check_counts(ap, args, "workers")
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the audit compiles for the GPU, the interpreter compiles nothing")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before minutes of compiling, not after

    t0 = time.time()
    rows = triton_rows(args.arch, args.dtypes, workers=args.workers)
    for r in rows:
        r["findings"] = triton_findings(r)
    notes = []
    if not args.no_cuda:
        crows = cuda_rows()
        for r in crows:
            r["findings"] = cuda_findings(r)
        rows += crows
        notes = cuda_launch_limits(crows)
    new, known = [], collections.Counter()
    for r in rows:
        for f in r["findings"]:
            rule = next((k for k in KNOWN if k[0] == r["backend"] and f.startswith(k[1])), None)
            if rule:
                known[rule] += 1
            else:
                new.append(f"{r['backend']} {r['kernel']} {r['target']} {r['dtype']} D={r['head_dim']} "
                           f"{r['config']}: {f}")  # fmt: skip
    env = environment("cpu")
    commit = (env["git_commit"] or "unknown")[:10] + (" (uncommitted changes)" if env["git_dirty"] else "")
    report = [
        "# Static GPU audit (compiled here, no GPU: nothing in this table is a measurement of speed)",
        "",
        f"`python -m bench audit` at commit {commit}, torch {env['torch']}, Triton {env['triton']}, on "
        f"{env['date']}: {len(rows)} kernels read in {time.time() - t0:.0f} s.",
        "Triton: every tile the kernels can choose on each target (the autotune spaces in kernels/utils.py, "
        "pruned per architecture and head dim as on the device), compiled with a real launch's specialisations "
        "(GROUP=4, causal, no padding mask). CUDA: the kernels in the built `reasoncache._C`. SASS counts: "
        "HGMMA = wgmma, HMMA = mma.sync, LDSM = ldmatrix, LDGSTS = cp.async, UTMALDG = TMA, LD.E = generic loads.",
        "",
        render(rows),
    ]
    if notes:
        report += ["", "CUDA shared memory per block against each architecture's opt-in limit:", *notes]
    report += ["", f"Known findings ({sum(known.values())}), each named by an open issue:"]
    report += [f"- {b} {rule}: {n} kernel(s); {KNOWN[(b, rule)]}" for (b, rule), n in known.items()] or ["- none"]
    report += ["", f"New findings: {len(new)}"] + [f"- {x}" for x in new]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        write_json(Path(args.out).with_suffix(".json"), env, rows)
    return 1 if (args.check and new) else 0


if __name__ == "__main__":
    sys.exit(main())
