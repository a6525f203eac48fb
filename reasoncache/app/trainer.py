"""Training a prefix (or any small set of trainable parameters) on demonstrations.

AdamW, linear warmup + cosine decay, an optional moving average of the trained
parameters (``ema_decay``), gradient accumulation, bf16 autocast on GPU,
gradient checkpointing, length-grouped batches, atomic checkpoints with exact resume,
and data parallelism over ``torch.distributed`` (launch with ``torchrun``; gloo on CPU,
NCCL on GPU), the frozen model optionally sharded by FSDP2 (``app/sharding.py``). The
loss is the mean over completion tokens of the whole global batch, so N processes with
batch B give the same update as one process with batch N*B.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._checks import is_int_at_least
from ..hf import prefix_suspended
from .data import IGNORE, Example, batch_order, collate, collate_packed, encode
from .evaluate import check_answer_pattern, evaluate, gold_answers
from .sharding import is_sharded

OBJECTIVES = ("sft", "distill")
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class TrainingDiverged(FloatingPointError):
    """A step's loss or gradient norm was not finite (NaN or inf). The step was not applied:
    the parameters, the optimizer and the checkpoint on disk hold what the step before left."""


@dataclass
class TrainConfig:
    """Everything a ``Trainer`` run needs besides the model and data; ``reasoncache train``'s flags set
    most of these fields. The fields in ``TRAJECTORY`` change the run's steps, so
    ``--resume`` refuses a checkpoint written with other values of them. ``check`` validates."""

    steps: int = 300
    batch_size: int = 4  # examples per micro-batch, per process; 4 beat 8 at equal examples (quality.md)
    grad_accum: int = 1  # micro-batches per step, per process
    lr: float = 3e-2  # for a prefix; LoRA wants ~2e-3 (bench/results/quality.md)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    value_lr_ratio: float = 1.0  # a prefix's values learn at lr * this (its keys and everything else at lr)
    adam_beta2: float = 0.999  # AdamW's second-moment decay; lower forgets the large early gradients sooner
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # > 0: the model ends (and is evaluated) at this moving average of its trained parameters
    seed: int = 0
    length_grouped: bool = True
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: autocast to bf16 on CUDA only
    checkpoint_every: int = 50
    eval_every: int = 0
    eval_steps: list[int] = field(default_factory=list)
    eval_limit: int | None = None
    eval_at_end: bool = True
    max_new_tokens: int = 128
    chat_template: bool = True
    max_len: int = 1024
    answer_pattern: str | None = None
    objective: str = "sft"  # "sft": cross-entropy on completions; "distill": match the frozen model shown demos
    distill_shots: int = 3  # demonstrations in the distillation teacher's context
    report_to: str | None = None  # "tensorboard": also log every row there (OUT/tensorboard)
    packing: bool = True  # one row per micro-batch, no padding, where the model computes it exactly (checked)

    # fields that change the training trajectory: a resumed run must match them
    TRAJECTORY = (
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_ratio",
        "min_lr_ratio",
        "weight_decay",
        "value_lr_ratio",
        "adam_beta2",
        "max_grad_norm",
        "ema_decay",
        "seed",
        "length_grouped",
        "max_len",
        "chat_template",
        "objective",
        "distill_shots",
        "packing",
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field with a value training cannot use (``reasoncache
        train`` calls it before it loads the model, so a bad flag costs no loading or training)."""
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "max_new_tokens", "max_len"):
            v = getattr(self, name)
            if not is_int_at_least(v, 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not is_int_at_least(self.eval_every, 0):
            raise ValueError(f"eval_every must be an int >= 0 (0: only at the end), got {self.eval_every!r}")
        if self.eval_limit is not None and not is_int_at_least(self.eval_limit, 1):
            raise ValueError(f"eval_limit must be None (every example) or a positive int, got {self.eval_limit!r}")
        bad_steps = [s for s in self.eval_steps if not is_int_at_least(s, 0) or s > self.steps]
        if bad_steps:
            raise ValueError(f"eval_steps must be ints in [0, steps={self.steps}], got {bad_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.value_lr_ratio > 0 and math.isfinite(self.value_lr_ratio)):
            raise ValueError(f"value_lr_ratio must be a positive number, got {self.value_lr_ratio!r}")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"adam_beta2 must be in (0, 1), got {self.adam_beta2!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not 0 <= self.max_grad_norm <= math.inf:
            # a negative clip would flip every gradient's sign inside clip_grad_norm_
            raise ValueError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "distill" and (not isinstance(self.distill_shots, int) or self.distill_shots < 1):
            raise ValueError(f"distill_shots must be a positive int, got {self.distill_shots!r}")
        check_answer_pattern(self.answer_pattern)
        if self.report_to not in (None, "tensorboard"):
            raise ValueError(f"report_to must be None or 'tensorboard', got {self.report_to!r}")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    warm = int(cfg.warmup_ratio * cfg.steps)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def world() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_world() -> None:
    """End the process group ``world`` started, once every process got here: left to
    interpreter exit, the gloo group's threads are torn down in no set order, which can abort
    a process that already finished its work (seen once in CI: SIGABRT, "terminate called
    without an active exception"). Does nothing outside torchrun."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing under either transformers API name (5.23
    renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()  # non-reentrant by default
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _completion_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, T, V]`` at the positions that predict completion tokens, and their
    targets ``[B, T]`` (``IGNORE`` where a row has none). Logits are computed only from the
    first completion position on (``logits_to_keep``): the prompt part of the vocabulary
    projection is never paid for."""
    labels = batch["labels"]
    target = labels[:, 1:]
    cols = (target != IGNORE).any(0).nonzero()
    lo, hi = int(cols.min()), int(cols.max()) + 1  # logits at lo..hi-1 predict labels lo+1..hi
    # A packed batch (position_ids, no attention_mask) runs without a KV cache, so that
    # transformers builds the block-diagonal mask for models that are not patched too.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "position_ids" in batch:
        inputs["use_cache"] = False
    try:
        logits = model(**inputs, logits_to_keep=torch.arange(lo, hi, device=labels.device)).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**inputs).logits[:, lo:hi]
    return logits, target[:, lo:hi]


def completion_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over completion tokens, and their count."""
    logits, t = _completion_logits(model, batch)
    loss = F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((t != IGNORE).sum())


@contextlib.contextmanager
def frozen_teacher(model: nn.Module):
    """``model`` as its frozen base: a patched model with its prefix suspended, a PEFT model
    with its adapter disabled."""
    if getattr(model, "reasoncache", None) is not None:
        with prefix_suspended(model):
            yield model
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError("the distill objective needs a reasoncache-patched or PEFT model (its frozen base teaches)")


def distill_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], teacher_batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || student) over completion tokens, and their count. The student is
    ``model`` on ``batch`` (the question alone); the teacher is the frozen base model on
    ``teacher_batch`` (demonstrations, then the same question and completion). Both hold
    the same completion tokens per row, so their completion positions pair up in order."""
    logits, t = _completion_logits(model, batch)
    with torch.no_grad(), frozen_teacher(model):
        t_logits, tt = _completion_logits(model, teacher_batch)
    student = logits[t != IGNORE].float().log_softmax(-1)
    teacher = t_logits[tt != IGNORE].float().log_softmax(-1)
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher completions differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    return F.kl_div(student, teacher, log_target=True, reduction="sum"), student.shape[0]


def tensorboard_writer(log_dir: Path):
    """A TensorBoard ``SummaryWriter`` (the optional ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(log_dir))


def plot_loss_curve(history: list[dict], path: Path) -> bool:
    """Training loss against step as a PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class Trainer:
    """Trains the parameters of ``model`` that require grad (a patched model's
    ``reasoncache`` prefix, or a PEFT adapter) on ``examples``.

    ``out_dir`` receives ``checkpoint.pt`` (atomic: written then renamed) every
    ``checkpoint_every`` steps and at the end, and ``log.jsonl`` (one JSON object per
    step: loss, learning rate, the gradient's global norm before clipping; plus evaluation
    rows). ``resume=True`` continues from the checkpoint exactly. A step whose loss or
    gradient norm is not finite raises ``TrainingDiverged`` before it updates anything.
    """

    def __init__(
        self,
        model: nn.Module,
        tok,
        examples: list[Example],
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        eval_examples: list[Example] | None = None,
        progress: bool = True,
    ):
        cfg.check()
        self.model, self.tok, self.cfg = model, tok, cfg
        self.out = Path(out_dir)
        self.rank, self.world = world()
        self.sharded = is_sharded(model)  # FSDP2 (app/sharding.py): every process joins every forward
        self.device = next(model.parameters()).device
        self.encoded = [encode(tok, e, cfg.chat_template, cfg.max_len) for e in examples]
        self.demos: list[Example] = []
        if cfg.objective == "distill":  # one fixed set of demonstrations for the teacher, drawn by seed
            if len(examples) < cfg.distill_shots:
                raise ValueError(f"distill_shots={cfg.distill_shots} needs as many examples, got {len(examples)}")
            self.demos = random.Random(cfg.seed).sample(list(examples), cfg.distill_shots)
            self.teacher = [encode(tok, e, cfg.chat_template, cfg.max_len, self.demos) for e in examples]
        self.lengths = [len(x) for x, _ in self.encoded]
        self.eval_examples = eval_examples
        if eval_examples:  # before training, not after it: an unscorable row would fail the last evaluation
            gold_answers(eval_examples, cfg.answer_pattern)
        self.progress = progress and self.rank == 0
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters; patch it with a ReasonCache first")
        values = [p for n, p in self.params if n.endswith(".values")]
        groups = [{"params": [p for n, p in self.params if not n.endswith(".values")]}]
        if values:  # a prefix's values: their own rate, the scheduler scales both groups alike
            groups.append({"params": values, "lr": cfg.lr * cfg.value_lr_ratio})
        groups = [g for g in groups if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_multiplier(s, cfg))
        # the moving average (cfg.ema_decay) of the trained parameters: fp32 sums from zero, which
        # _average() divides by 1 - decay^step (Adam's bias correction), so no weight stays on the init
        self.ema = [torch.zeros_like(p, dtype=torch.float32) for _, p in self.params] if cfg.ema_decay else None
        self.step = 0
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk, once saved or loaded
        self._epochs: dict[int, list[list[int]]] = {}
        self.history: list[dict] = []
        self._tb = tensorboard_writer(self.out / "tensorboard") if cfg.report_to and self.rank == 0 else None
        self.packing = cfg.packing and self._packing_is_exact()
        if cfg.packing and not self.packing:
            warnings.warn(
                f"packing=True: {type(model).__name__} gives other results for a packed micro-batch than for a "
                "padded one (its attention does not separate the examples); training with padding instead",
                RuntimeWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ data
    def _micro_batch(self, g: int) -> list[int]:
        per_epoch = len(self._epoch(0))
        return self._epoch(g // per_epoch)[g % per_epoch]

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            self._epochs[e] = batch_order(self.lengths, self.cfg.batch_size, self.cfg.seed, e, self.cfg.length_grouped)
        return self._epochs[e]

    def _step_batches(self, step: int) -> tuple[list[list[int]], int]:
        """This process's micro-batches for ``step`` and the global completion-token count."""
        per_step = self.cfg.grad_accum * self.world
        all_mb = [self._micro_batch(step * per_step + j) for j in range(per_step)]
        tokens = sum(1 for mb in all_mb for i in mb for y in self.encoded[i][1][1:] if y != IGNORE)
        mine = all_mb[self.rank * self.cfg.grad_accum : (self.rank + 1) * self.cfg.grad_accum]
        return mine, tokens

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Write the trained parameters, optimizer, scheduler, RNG and config to ``out/checkpoint.pt``
        (rank 0 only; atomically, through a temporary file, so a kill never leaves half a checkpoint)."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            state = {
                "step": self.step,
                "trainable": {n: p.detach().cpu().clone() for n, p in self.params},
                "ema": None if self.ema is None else {n: a.cpu().clone() for (n, _), a in zip(self.params, self.ema)},
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state(),
                "config": asdict(self.cfg),
            }
            tmp = self.out / (CHECKPOINT + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.out / CHECKPOINT)
        self.checkpoint_step = self.step

    def load_checkpoint(self) -> bool:
        """Restore ``out/checkpoint.pt`` if it exists (returns whether it did); raise ``ValueError`` if it
        was written with other ``TRAJECTORY`` settings, naming each difference."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        # a field added after the checkpoint was written held its default then
        defaults = TrainConfig()
        saved = {**{k: getattr(defaults, k) for k in TrainConfig.TRAJECTORY}, **state["config"]}
        diffs = [
            f"{k}: checkpoint {saved[k]!r}, now {getattr(self.cfg, k)!r}"
            for k in TrainConfig.TRAJECTORY
            if saved[k] != getattr(self.cfg, k)
        ]
        if diffs:
            raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(diffs)})")
        names = {n for n, _ in self.params}
        if set(state["trainable"]) != names:
            raise ValueError(
                f"--resume: {path} holds parameters {sorted(state['trainable'])}, the model trains {sorted(names)}"
            )
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(state["trainable"][n])
        if self.ema is not None:  # ema_decay matched above, so the checkpoint holds the average
            self.ema = [state["ema"][n].to(a.device) for (n, _), a in zip(self.params, self.ema)]
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step = self.checkpoint_step = state["step"]
        return True

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG).open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self._tb.add_scalar(k, v, row["step"])
                self._tb.flush()

    def _keep_log_to_checkpoint(self) -> None:
        """On resume: drop the log rows an interrupted run wrote after its last checkpoint (the
        resumed run writes those steps again), and start the history with the rows kept."""
        path = self.out / LOG
        if self.rank != 0 or not path.is_file():
            return
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.history = [r for r in rows if r.get("step", 0) <= self.step]
        tmp = path.with_name(LOG + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._bf16)

    @property
    def _bf16(self) -> bool:
        """bf16 autocast: ``cfg.bf16``, or by default on CUDA only."""
        return self.cfg.bf16 if self.cfg.bf16 is not None else self.device.type == "cuda"

    def _collate(self, encoded: list, mb: list[int], packed: bool | None = None) -> dict[str, torch.Tensor]:
        packed = self.packing if packed is None else packed
        rows = (collate_packed if packed else collate)([encoded[i] for i in mb], self.tok.pad_token_id)
        return {k: v.to(self.device) for k, v in rows.items()}

    def _packing_is_exact(self) -> bool:
        """Packing is on where it is exact: the first micro-batch, packed and padded, must
        give the same completion log-probabilities (a model whose attention ignores the
        position ids would let examples see each other). Checked once, in eval mode."""
        mb = self._micro_batch(0)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                lp = []
                for packed in (True, False):
                    logits, t = _completion_logits(self.model, self._collate(self.encoded, mb, packed))
                    lp.append(logits[t != IGNORE].float().log_softmax(-1))
        finally:
            self.model.train(was)
        if not bool(torch.isfinite(lp[1]).all()):  # nothing to compare: the first step raises TrainingDiverged
            return True
        return lp[0].shape == lp[1].shape and bool((lp[0] - lp[1]).abs().max() <= (5e-2 if self._bf16 else 1e-4))

    def train_step(self) -> float:
        """One optimizer step over this process's micro-batches (gradients summed over processes);
        returns the step's loss per completion token."""
        mbs, tokens = self._step_batches(self.step)
        loss_sum = torch.zeros((), device=self.device)
        for mb in mbs:
            batch = self._collate(self.encoded, mb)
            with self._autocast():
                if self.cfg.objective == "distill":
                    loss, _ = distill_loss(self.model, batch, self._collate(self.teacher, mb))
                else:
                    loss, _ = completion_loss(self.model, batch)
            (loss / tokens).backward()
            loss_sum += loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        if self.world > 1:
            flat = torch.cat([g.flatten() for g in grads] + [loss_sum.reshape(1)])
            dist.all_reduce(flat)
            loss_sum = flat[-1]
            off = 0
            for (_, p), g in zip(self.params, grads):
                p.grad = flat[off : off + g.numel()].view_as(g).clone()
                off += g.numel()
        # the global norm before clipping, logged; max_norm=inf measures without clipping
        clip = self.cfg.max_grad_norm or float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.params], clip))
        loss = float(loss_sum) / tokens
        if not (math.isfinite(loss) and math.isfinite(self.grad_norm)):
            # every process sees the same summed loss and norm, so all of them stop here together
            self.opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(self._diverged_message(loss))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            with torch.no_grad():
                for (_, p), a in zip(self.params, self.ema):
                    a.lerp_(p.detach().float(), 1 - self.cfg.ema_decay)
        return loss

    def _diverged_message(self, loss: float) -> str:
        bad = [n for n, p in self.params if not torch.isfinite(p).all()]
        if bad:
            state = f"The trained parameters already hold NaN or inf ({', '.join(bad[:3])}{', ...' * (len(bad) > 3)})."
        else:
            state = f"The step was not applied, so the parameters hold step {self.step}'s values."
        if self.checkpoint_step is None:
            kept = f"no checkpoint was written yet (checkpoint_every={self.cfg.checkpoint_every})"
        else:
            kept = f"the last checkpoint, {self.out / CHECKPOINT} (step {self.checkpoint_step}), is intact"
        return (
            f"training diverged at step {self.step + 1} of {self.cfg.steps}: the loss is {loss} and the gradient "
            f"norm {self.grad_norm} (learning rate {self.sched.get_last_lr()[0]:.3g} this step, lr={self.cfg.lr:g}). "
            f"{state} Nothing more was saved; {kept}. A learning rate too high for this model is the usual cause: "
            "train again with a lower one (a third, say); resuming (--resume) continues only with the same settings."
            + (" The model runs in float16, whose range activations can overflow: bfloat16 or float32 avoid that."
               if any(p.dtype == torch.float16 for p in self.model.parameters()) else "")
        )  # fmt: skip

    def _average(self) -> list[torch.Tensor]:
        """The moving average after ``step`` steps: ``sum_t (1 - d) d^(step - t) p_t / (1 - d^step)``
        over the parameters ``p_t`` after each step ``t``, ``d = ema_decay``; the parameters
        themselves before the first step."""
        if self.step == 0:
            return [p.detach().float() for _, p in self.params]
        c = 1 - self.cfg.ema_decay**self.step
        return [a / c for a in self.ema]

    def hold_average(self) -> None:
        """Leave the moving average of the trained parameters in the model (``train`` does
        this when it ends; the checkpoint keeps both); without ``ema_decay``, nothing changes."""
        if self.ema is not None:
            with torch.no_grad():
                for (_, p), a in zip(self.params, self._average()):
                    p.copy_(a)

    @contextlib.contextmanager
    def averaged(self):
        """The model holds the moving average of its trained parameters inside this block
        (its trained parameters again after it); without ``ema_decay``, nothing changes."""
        if self.ema is None:
            yield
            return
        raw = [p.detach().clone() for _, p in self.params]
        self.hold_average()
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), r in zip(self.params, raw):
                    p.copy_(r)

    def evaluate(self, limit: int | None = None) -> dict:
        """Accuracy on ``eval_examples`` (the first ``limit``), with the moving average of the
        parameters where ``ema_decay`` keeps one."""
        examples = self.eval_examples[:limit] if limit else self.eval_examples
        was = self.model.training
        self.model.eval()
        try:
            with self.averaged():
                res = evaluate(
                    self.model,
                    self.tok,
                    examples,
                    max_new_tokens=self.cfg.max_new_tokens,
                    chat_template=self.cfg.chat_template,
                    answer_pattern=self.cfg.answer_pattern,
                    progress=self.progress,
                    synced_gpus=self.sharded,
                )
        finally:
            self.model.train(was)
        return res

    def _maybe_eval(self) -> None:
        # Rank 0 evaluates alone, except under FSDP, where all ranks generate together
        # (the same examples; rank 0 logs).
        if not self.eval_examples or (self.rank != 0 and not self.sharded):
            return
        due = (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step in self.cfg.eval_steps
        if due or (self.cfg.eval_at_end and self.step == self.cfg.steps):
            res = self.evaluate(self.cfg.eval_limit)
            row = {
                "step": self.step,
                "examples_seen": self.step * self.cfg.batch_size * self.cfg.grad_accum * self.world,
                "eval_accuracy": res["accuracy"],
                "eval_n": res["n"],
            }
            self._log(row)

    def train(self, resume: bool = False) -> list[dict]:
        """Run to ``cfg.steps`` (from the checkpoint with ``resume=True``), checkpointing and evaluating
        as configured; returns the log rows (also written to ``out/log.jsonl``: a fresh run replaces
        it, a resumed one keeps its rows up to the checkpoint)."""
        from tqdm.auto import tqdm

        if resume and self.load_checkpoint():
            self._keep_log_to_checkpoint()
            if self.progress:
                print(f"resuming from step {self.step}", flush=True)
        elif self.step == 0 and self.rank == 0:  # a fresh run starts a fresh log
            (self.out / LOG).unlink(missing_ok=True)
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.model.train()
        if self.step == 0 and 0 in self.cfg.eval_steps:
            self._maybe_eval()
        start = time.time()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="training", disable=not self.progress)
        while self.step < self.cfg.steps:
            loss = self.train_step()
            self._log(
                {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.sched.get_last_lr()[0],
                    "grad_norm": self.grad_norm,
                    "elapsed_s": round(time.time() - start, 3),
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
            self._maybe_eval()
        bar.close()
        self.hold_average()
        return self.history
