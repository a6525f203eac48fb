"""End-to-end prefix-training step: tokens/s and peak memory, same batch and length.

Methods:
  reasoncache   patched model, the fused op (one shared prefix per layer)
  peft-prefix   PEFT prefix tuning: the prefix copied into every sequence's cache and
                concatenated into HF's own SDPA attention (PEFT refuses gradient
                checkpointing, so that variant is skipped with its reason)
  lora          PEFT LoRA on q and v with about the same trainable parameters

A second table times packing: one length-skewed batch of the reasoncache method,
padded to its longest example (attention mask, ignored labels) against packed into one
row (position ids restarting per example, the fused op's varlen path), after checking
that both give the same loss. Tokens/s there counts real tokens only.

Models: Llama-shaped with random weights (``1b`` and ``8b`` configs on GPU, ``tiny`` on
CPU) or ``default``, the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import time

import torch

import reasoncache

from .common import bench_parser, check_counts, environment, markdown_table, parse_bench_args, write_json

CONFIGS = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def build(name: str, device: str, dtype: torch.dtype):
    """The model ``name`` (``default``: SmolLM2-135M) on ``device`` in ``dtype``, for the training benchmark."""
    if name == "default":
        from reasoncache.app.models import load_model

        model, _ = load_model(device=device, dtype=dtype)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**CONFIGS[name], max_position_embeddings=8192)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.set_attn_implementation("sdpa")
    return model


METHODS = ("reasoncache", "peft-prefix", "lora")


def prepare(method: str, model, prefix_len: int, checkpointing: bool):
    """Wrap ``model`` for ``method``; returns (trainable model, trainable parameter count)."""
    from reasoncache.app.baselines import matched_lora
    from reasoncache.app.trainer import enable_checkpointing

    if method == "reasoncache":
        cache = reasoncache.ReasonCache.for_model(model, prefix_len=prefix_len, init="random")
        net = reasoncache.patch(model, cache)
    elif method == "peft-prefix":
        from peft import PrefixTuningConfig, get_peft_model

        if checkpointing:
            raise RuntimeError("PEFT prefix tuning does not support gradient checkpointing")
        net = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len))
    elif method == "lora":
        shape = reasoncache.hf.models.model_shape(model)
        target = 2 * shape.num_layers * shape.num_kv_heads * prefix_len * shape.head_dim
        net, _, _ = matched_lora(model, target)
    else:
        raise ValueError(method)
    if checkpointing:
        enable_checkpointing(net)
    net.train()
    return net, sum(p.numel() for p in net.parameters() if p.requires_grad)


class StepRunner:
    """One training step (forward, backward, AdamW) of a prepared model on fixed random tokens."""

    def __init__(self, net, B: int, N: int, device: str):
        self.net, self.device = net, device
        g = torch.Generator(device).manual_seed(0)
        ids = torch.randint(net.config.vocab_size, (B, N), device=device, generator=g)
        self.inputs = dict(input_ids=ids, labels=ids)
        self.opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(self) -> float:
        t0 = time.perf_counter()
        with self.autocast:
            loss = self.net(**self.inputs).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


# A length-skewed batch (most examples short, one long), as a trainer's data often is.
SKEWED = (0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 1.0)


class PackedStepRunner(StepRunner):
    """A step on examples of ``lengths``: padded to the longest (``packed=False``) or back
    to back in one row with position ids restarting per example (``packed=True``)."""

    def __init__(self, net, lengths: list[int], device: str, packed: bool):
        super().__init__(net, 1, 1, device)
        g = torch.Generator(device).manual_seed(1)
        seqs = [torch.randint(net.config.vocab_size, (n,), device=device, generator=g) for n in lengths]
        if packed:
            ids = torch.cat(seqs)[None]
            labels = torch.cat([torch.cat([s.new_full((1,), -100), s[1:]]) for s in seqs])[None]
            pos = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
            self.inputs = dict(input_ids=ids, labels=labels, position_ids=pos, use_cache=False)
        else:
            n = max(lengths)
            ids = torch.zeros(len(seqs), n, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, sq in enumerate(seqs):
                ids[i, : len(sq)], mask[i, : len(sq)] = sq, 1
            self.inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def loss(self) -> float:
        with torch.no_grad(), self.autocast:
            return float(self.net(**self.inputs).loss)


def packing_rows(model_name: str, B: int, N: int, P: int, device: str, steps: int) -> list[dict]:
    """Packed against padded for one length-skewed batch of ``B`` examples, the longest
    ``N`` tokens (the shapes of ``SKEWED``, repeated to ``B``). Same loss first (1e-4
    relative), then median step times, interleaved round by round."""
    lengths = [max(2, int(N * SKEWED[i % len(SKEWED)])) for i in range(B)]
    runners = {}
    for packed in (False, True):
        torch.manual_seed(0)
        net, _ = prepare("reasoncache", build(model_name, device, torch.float32), P, False)
        runners[packed] = PackedStepRunner(net, lengths, device, packed)
    losses = {k: r.loss() for k, r in runners.items()}
    if abs(losses[True] - losses[False]) > 1e-4 * abs(losses[False]):
        raise AssertionError(f"packed loss {losses[True]:.6f} != padded loss {losses[False]:.6f}")
    times: dict[bool, list[float]] = {False: [], True: []}  # rows: padded, then packed
    for r in range(steps + 1):
        for k, runner in runners.items():
            t = runner.step()
            if r:
                times[k].append(t)
    rows = []
    for packed, ts in times.items():
        step_s = statistics.median(ts)
        rows.append({
            "model": model_name, "B": B, "longest": max(lengths), "real_tokens": sum(lengths), "P": P,
            "layout": "packed (varlen)" if packed else "padded", "loss": losses[packed],
            "computed_tokens": sum(lengths) if packed else B * max(lengths),
            "step_s": step_s, "real_tokens_per_s": sum(lengths) / step_s,
        })  # fmt: skip
    rows[1]["speedup_vs_padded"] = rows[0]["step_s"] / rows[1]["step_s"]
    return rows


PACKING_COLUMNS = [
    ("model", "model"),
    ("B", "B"),
    ("longest", "longest"),
    ("real tokens", "real_tokens"),
    ("layout", "layout"),
    ("tokens computed", "computed_tokens"),
    ("loss", "loss"),
    ("step s (median)", "step_s"),
    ("real tokens/s", "real_tokens_per_s"),
    ("x padded", "speedup_vs_padded"),
]


def _median_s(runner: StepRunner, steps: int) -> float:
    runner.step()  # warm-up (and autotuning)
    return statistics.median(runner.step() for _ in range(steps))


def run(model_name: str, B: int, N: int, P: int, device: str, steps: int, methods: list[str]) -> list[dict]:
    """Median step time per (method, checkpointing). On the CPU all methods of a group are
    built first and timed interleaved, round by round after a shared warm-up round, so
    that allocator growth and clock changes fall on all alike (timed one after another,
    the first method measured up to 15% slower here). On CUDA, where several large models
    may not fit at once, each is built, timed (with its peak memory) and freed in turn."""
    rows = []
    for ckpt in (False, True):
        group, runners = [], {}
        for method in methods:
            row = {"model": model_name, "B": B, "N": N, "P": P, "method": method, "checkpointing": ckpt}
            group.append(row)
            try:
                net, row["trainable_params"] = prepare(method, build(model_name, device, torch.float32), P, ckpt)
            except (RuntimeError, ValueError) as e:
                row["skipped"] = str(e).splitlines()[0][:200]
                continue
            runner = StepRunner(net, B, N, device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                row["step_s"] = _median_s(runner, steps)
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                del net, runner
                gc.collect()
                torch.cuda.empty_cache()
            else:
                runners[method] = runner
        if runners:
            times: dict[str, list[float]] = {m: [] for m in runners}
            for r in range(steps + 1):
                for m, runner in runners.items():
                    t = runner.step()
                    if r:
                        times[m].append(t)
            for row in group:
                if row["method"] in times:
                    row["step_s"] = statistics.median(times[row["method"]])
                    row["step_s_min"] = min(times[row["method"]])
        del runners
        gc.collect()
        rows += group
    base = next((r.get("step_s") for r in rows if r["method"] == "peft-prefix" and not r["checkpointing"]), None)
    for r in rows:
        if r.get("step_s"):
            r["tokens_per_s"] = B * N / r["step_s"]
            if base:
                r["speedup_vs_peft_prefix"] = base / r["step_s"]
    return rows


COLUMNS = [
    ("model", "model"),
    ("B x N", "shape"),
    ("P", "P"),
    ("method", "method"),
    ("checkpointing", "checkpointing"),
    ("trainable", "trainable_params"),
    ("step s (median)", "step_s"),
    ("step s (min)", "step_s_min"),
    ("tokens/s", "tokens_per_s"),
    ("x peft-prefix", "speedup_vs_peft_prefix"),
    ("peak MiB", "peak_mib"),
]


def main(argv: list[str] | None = None, prog: str = "python -m bench train") -> list[dict]:
    ap = bench_parser(prog, __doc__)
    ap.add_argument(
        "--model", default=None, help="tiny | 1b | 8b | default (SmolLM2); default: tiny on CPU, 1b and 8b on CUDA"
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    args = parse_bench_args(ap, argv)
    check_counts(ap, args, "batch_size", "seq_len", "prefix_len", "steps")
    models = [args.model] if args.model else (["tiny"] if args.device == "cpu" or args.quick else ["1b", "8b"])
    unknown = [m for m in models if m not in CONFIGS and m != "default"]
    if unknown:
        ap.error(f"--model: unknown {unknown}; choose from {list(CONFIGS) + ['default']}")
    B = args.batch_size or (2 if args.quick else 8)
    N = args.seq_len or (64 if args.quick else (100 if args.device == "cpu" else 2048))
    steps = args.steps or (2 if args.quick else 5)
    methods = [m.strip() for m in args.methods.split(",")]
    if set(methods) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; choose from {list(METHODS)}")
    if {"peft-prefix", "lora"} & set(methods) and importlib.util.find_spec("peft") is None:
        ap.error("--methods peft-prefix and lora need peft: pip install 'reasoncache[demo]' (or --methods reasoncache)")
    env = environment(args.device)
    rows = [r for m in models for r in run(m, B, N, args.prefix_len, args.device, steps, methods)]
    for r in rows:
        r["shape"] = f"{r['B']} x {r['N']}"
    print(f"# prefix-training step on {env['device']} (median of {steps} steps after warm-up)\n")
    print(markdown_table([r for r in rows if "skipped" not in r], COLUMNS))
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['method']} (checkpointing={r['checkpointing']}): {r['skipped']}")
    if "reasoncache" in methods:
        packing = [r for m in models for r in packing_rows(m, max(B, 8), N, args.prefix_len, args.device, steps)]
        print(f"\n# packing: one length-skewed batch, reasoncache, on {env['device']}\n")
        print(markdown_table(packing, PACKING_COLUMNS))
        rows += [{**r, "table": "packing"} for r in packing]
    if args.out:
        write_json(args.out, env, rows)
        print(f"\nwrote {args.out}")
    return rows
