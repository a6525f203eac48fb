"""The trainer: schedule, exact resume, atomic checkpoints, data parallelism on gloo."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import reasoncache
from helpers import poison_step
from reasoncache import build_cache
from reasoncache.app.data import Example
from reasoncache.app.tasks import make_split
from reasoncache.app.trainer import CHECKPOINT, LOG, TrainConfig, Trainer, TrainingDiverged, lr_multiplier
from reasoncache.cache import per_layer_lengths
from tiny_models import tiny_model, tiny_tokenizer


def _setup(steps=6, batch_size=2, grad_accum=1, **kw):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 24, 0, seed=0)
    reasoncache.patch(model, build_cache(model, tok, train, prefix_len=4))
    cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, checkpoint_every=3, **kw)
    return model, tok, train, cfg


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_ratio=0.1)
    m = [lr_multiplier(s, cfg) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:])) and m[-1] < 0.01


def test_training_lowers_the_loss_and_logs(tmp_path):
    model, tok, train, cfg = _setup(steps=12, batch_size=4)
    hist = Trainer(model, tok, train, cfg, tmp_path, progress=False).train()
    losses = [r["loss"] for r in hist if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert len((tmp_path / LOG).read_text().splitlines()) == 12
    assert (tmp_path / CHECKPOINT).is_file() and not (tmp_path / (CHECKPOINT + ".tmp")).exists()


def test_resume_continues_exactly(tmp_path):
    model, tok, train, cfg = _setup(steps=6)
    Trainer(model, tok, train, cfg, tmp_path / "full", progress=False).train()
    want = model.reasoncache.keys.detach().clone()

    model, tok, train, cfg = _setup(steps=6)
    t = Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False)
    while t.step < 3:  # interrupted right after the step-3 checkpoint
        t.train_step()
    t.save_checkpoint()
    model, tok, train, cfg = _setup(steps=6)  # a fresh process: new model, new optimizer
    t = Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False)
    t.train(resume=True)
    assert t.step == 6 and torch.equal(model.reasoncache.keys.detach(), want)


def test_a_nan_loss_stops_training_before_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    model, tok, train, cfg = _setup(steps=6)
    t = Trainer(model, tok, train, cfg, tmp_path / "clean", progress=False)
    while t.step < 4:
        t.train_step()
    want = [p.detach().clone() for _, p in t.params]

    poison_step(monkeypatch, at=5)
    model, tok, train, cfg = _setup(steps=6)
    t = Trainer(model, tok, train, cfg, tmp_path / "run", progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5 of 6: the loss is nan") as err:
        t.train()
    assert "The step was not applied, so the parameters hold step 4's values" in str(err.value)
    assert "float16" not in str(err.value)  # an fp32 model is not told about fp16's range
    assert f"{tmp_path / 'run' / CHECKPOINT} (step 3), is intact" in str(err.value)
    assert t.step == 4 and all(torch.equal(p, w) for (_, p), w in zip(t.params, want))
    assert all(p.grad is None for _, p in t.params)
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert saved["step"] == 3 and all(torch.isfinite(x).all() for x in saved["trainable"].values())
    assert len((tmp_path / "run" / LOG).read_text().splitlines()) == 4  # no row for the step that failed


def test_resume_keeps_the_log_to_the_checkpoint_and_a_fresh_run_replaces_it(tmp_path, monkeypatch):
    """A run stopped at step 5 (checkpoint at 3) and resumed logs each step once, in order, and
    its history is the whole run; training again from scratch into that folder starts a new log."""
    model, tok, train, cfg = _setup(steps=6)
    Trainer(model, tok, train, cfg, tmp_path / "whole", progress=False).train()
    want = model.reasoncache.keys.detach().clone()

    with monkeypatch.context() as m:
        poison_step(m, at=5)
        model, tok, train, cfg = _setup(steps=6)
        with pytest.raises(TrainingDiverged):
            Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False).train()
    assert [json.loads(r)["step"] for r in (tmp_path / "cut" / LOG).read_text().splitlines()] == [1, 2, 3, 4]
    model, tok, train, cfg = _setup(steps=6)
    hist = Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False).train(resume=True)
    assert [r["step"] for r in hist] == [1, 2, 3, 4, 5, 6] and torch.equal(model.reasoncache.keys.detach(), want)
    rows = [json.loads(r) for r in (tmp_path / "cut" / LOG).read_text().splitlines()]
    assert rows == json.loads(json.dumps(hist))

    model, tok, train, cfg = _setup(steps=2)
    Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False).train()
    assert [json.loads(r)["step"] for r in (tmp_path / "cut" / LOG).read_text().splitlines()] == [1, 2]


def test_eval_examples_without_answers_are_refused_before_training(tmp_path):
    model, tok, train, cfg = _setup(steps=2)
    unscorable = [Example("Which day follows Monday?", "Tuesday")]
    with pytest.raises(ValueError, match="no answer to compare with"):
        Trainer(model, tok, train, cfg, tmp_path, eval_examples=unscorable, progress=False)
    assert not (tmp_path / LOG).exists()


def test_a_prefix_that_is_already_nan_is_named(tmp_path, recwarn):
    model, tok, train, cfg = _setup(steps=2)
    with torch.no_grad():
        model.reasoncache.values.view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"at step 1 of 2: .* already hold NaN or inf \(reasoncache\.values\)"):
        Trainer(model, tok, train, cfg, tmp_path, progress=False).train()
    assert not [w for w in recwarn if "packing" in str(w.message)]  # NaN is not evidence against packing


def test_a_diverged_float16_model_is_told_about_float16(tmp_path, monkeypatch):
    poison_step(monkeypatch, at=1)
    model, tok, train, cfg = _setup(steps=2)
    with pytest.raises(TrainingDiverged, match="The model runs in float16"):
        Trainer(model.half(), tok, train, cfg, tmp_path, progress=False).train()


def test_resume_with_other_settings_says_which(tmp_path):
    model, tok, train, cfg = _setup(steps=3)
    Trainer(model, tok, train, cfg, tmp_path, progress=False).train()
    model, tok, train, cfg = _setup(steps=3)
    cfg.lr = 5e-3
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.01, now 0.005"):
        Trainer(model, tok, train, cfg, tmp_path, progress=False).train(resume=True)


def test_resume_from_a_checkpoint_older_than_a_setting(tmp_path):
    """A checkpoint written before a TrainConfig field existed held that field's default:
    it resumes under the default and is refused under another value, naming the field."""
    model, tok, train, cfg = _setup(steps=3)
    t = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    t.train_step()
    t.save_checkpoint()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    del state["config"]["adam_beta2"]
    torch.save(state, tmp_path / CHECKPOINT)
    model, tok, train, cfg = _setup(steps=3)
    assert Trainer(model, tok, train, cfg, tmp_path, progress=False).load_checkpoint()
    model, tok, train, cfg = _setup(steps=3, adam_beta2=0.95)
    with pytest.raises(ValueError, match=r"adam_beta2: checkpoint 0.999, now 0.95"):
        Trainer(model, tok, train, cfg, tmp_path, progress=False).load_checkpoint()


def test_adam_beta2_reaches_the_optimizer(tmp_path):
    model, tok, train, cfg = _setup(steps=1, adam_beta2=0.95)
    t = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    assert all(g["betas"] == (0.9, 0.95) for g in t.opt.param_groups)


def test_gradient_checkpointing_matches(tmp_path):
    model, tok, train, cfg = _setup(steps=2)
    Trainer(model, tok, train, cfg, tmp_path / "a", progress=False).train()
    want = model.reasoncache.keys.detach().clone()
    model, tok, train, cfg = _setup(steps=2, gradient_checkpointing=True)
    Trainer(model, tok, train, cfg, tmp_path / "b", progress=False).train()
    torch.testing.assert_close(model.reasoncache.keys.detach(), want, atol=1e-6, rtol=1e-5)


def test_value_lr_ratio_moves_values_at_their_own_rate(tmp_path):
    """One Adam step moves every element by about lr (sign-like first step): the values by
    lr * value_lr_ratio, the keys by lr."""
    model, tok, train, cfg = _setup(steps=1, warmup_ratio=0.0, max_grad_norm=0.0, value_lr_ratio=4.0)
    k0, v0 = model.reasoncache.keys.detach().clone(), model.reasoncache.values.detach().clone()
    Trainer(model, tok, train, cfg, tmp_path, progress=False).train_step()
    dk = (model.reasoncache.keys.detach() - k0).abs().max().item()
    dv = (model.reasoncache.values.detach() - v0).abs().max().item()
    assert dk == pytest.approx(cfg.lr, rel=1e-3) and dv == pytest.approx(4 * cfg.lr, rel=1e-3)


def test_ema_is_the_moving_average_of_the_trained_prefix_and_the_model_ends_there(tmp_path):
    """The bias-corrected average: the parameters after steps 1..4 weighted 1/8, 1/4, 1/2, 1 at
    decay 0.5, over the sum of the weights; nothing of the initialization."""
    model, tok, train, cfg = _setup(steps=4, ema_decay=0.5)
    t = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    after = []
    for _ in range(4):
        t.train_step()
        after.append(model.reasoncache.keys.detach().clone())
    want = sum(w * k for w, k in zip((1, 2, 4, 8), after)) / 15
    raw = model.reasoncache.keys.detach().clone()
    assert not torch.allclose(raw, want)  # the average lags the trained prefix
    with t.averaged():  # what evaluation sees
        torch.testing.assert_close(model.reasoncache.keys.detach(), want)
    assert torch.equal(model.reasoncache.keys.detach(), raw)  # training goes on from its own parameters
    t.train()  # already at cfg.steps: no step runs, the model takes the average
    torch.testing.assert_close(model.reasoncache.keys.detach(), want)


def test_resume_continues_the_moving_average_exactly(tmp_path):
    model, tok, train, cfg = _setup(steps=6, ema_decay=0.9)
    Trainer(model, tok, train, cfg, tmp_path / "full", progress=False).train()
    want = model.reasoncache.keys.detach().clone()
    model, tok, train, cfg = _setup(steps=6, ema_decay=0.9)
    t = Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False)
    while t.step < 3:
        t.train_step()
    t.save_checkpoint()
    model, tok, train, cfg = _setup(steps=6, ema_decay=0.9)
    Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False).train(resume=True)
    assert torch.equal(model.reasoncache.keys.detach(), want)
    model, tok, train, cfg = _setup(steps=6)  # the same checkpoint without the average is refused
    with pytest.raises(ValueError, match=r"ema_decay: checkpoint 0.9, now 0.0"):
        Trainer(model, tok, train, cfg, tmp_path / "cut", progress=False).load_checkpoint()


def test_bad_config():
    with pytest.raises(ValueError, match="value_lr_ratio must be a positive number"):
        TrainConfig(value_lr_ratio=0.0).check()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0).check()
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(lr=-1.0).check()
    with pytest.raises(ValueError, match=r"adam_beta2 must be in \(0, 1\), got 1.0"):
        TrainConfig(adam_beta2=1.0).check()
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\) \(0: off\), got 1.0"):
        TrainConfig(ema_decay=1.0).check()
    # each of these used to fail late (a division by zero at the first checkpoint) or silently
    # (a negative clip flips the gradients; a negative eval_every evaluates every step)
    for bad, msg in (
        ({"checkpoint_every": 0}, "checkpoint_every must be a positive int, got 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"max_len": -1}, "max_len must be a positive int"),
        ({"eval_every": -1}, r"eval_every must be an int >= 0"),
        ({"eval_limit": 0}, "eval_limit must be None"),
        ({"eval_steps": [2, 400]}, r"eval_steps must be ints in \[0, steps=300\], got \[400\]"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"weight_decay": -0.1}, "weight_decay must be a number >= 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be >= 0"),
    ):
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad).check()
    for fine in ({"max_grad_norm": 0.0}, {"max_grad_norm": None}, {"eval_every": 0}, {"eval_steps": [0, 300]}):
        TrainConfig(**fine).check()
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 8, 0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model.requires_grad_(False), tok, train, TrainConfig(), "/tmp/unused", progress=False)
    with pytest.raises(ValueError, match="init must be"):
        build_cache(model, tok, train, 4, init="zeros")


def test_answers_init_is_the_worked_answers_as_a_demonstration():
    """init="answers": the prefix is exactly what the model computes for the training
    examples' worked answers (shuffled by seed, cut to prefix_len) placed before the input."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 8, 0)
    cache = build_cache(model, tok, train, 6, init="answers", seed=3)
    order = list(train)
    __import__("random").Random(3).shuffle(order)
    ids = tok(f"{order[0].completion}\n\n", add_special_tokens=False).input_ids[:6]
    assert len(ids) == 6  # one answer is long enough here: the cut is what is compared
    want = reasoncache.ReasonCache.from_demonstrations(model, torch.tensor([ids]))
    assert torch.equal(cache.keys, want.keys) and torch.equal(cache.values, want.values)
    assert torch.equal(build_cache(model, tok, train, 6, seed=3).keys, cache.keys)  # the default
    assert not torch.equal(cache.keys, build_cache(model, tok, train, 6, init="demonstrations", seed=3).keys)


def test_turns_init_is_the_answers_as_the_chat_templates_assistant_turns():
    """init="turns": the worked answers written as the chat template writes an assistant turn
    (the tiny template's "A: ...\\n"), the same shuffle and cut as "answers"; a tokenizer
    without a chat template is refused by name."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 8, 0)
    cache = build_cache(model, tok, train, [10, 4], init="turns", seed=3)
    order = list(train)
    __import__("random").Random(3).shuffle(order)
    ids = tok(f"A: {order[0].completion}\n", add_special_tokens=False).input_ids[:10]
    lengths = per_layer_lengths([10, 4], model.config.num_hidden_layers)
    want = reasoncache.ReasonCache.from_demonstrations(model, torch.tensor([ids]), layer_lengths=lengths)
    assert torch.equal(cache.keys, want.keys) and torch.equal(cache.values, want.values)
    tok.chat_template = None
    with pytest.raises(ValueError, match="init='turns' needs a tokenizer with a chat template"):
        build_cache(model, tok, train, 4, init="turns")


def test_keep_last_keeps_the_tail_computed_with_the_context():
    """from_demonstrations(keep_last=P): the prefix is the last P tokens' keys and values,
    computed with the tokens before them in context and at the positions right before the
    input. Layer 0 depends only on each token and its position, so there it equals the tail run
    alone; deeper layers saw the context, so there it differs. A keep_last longer than the
    demonstrations is refused by name."""
    model = tiny_model("llama")
    ids = torch.arange(3, 23)[None]  # 20 tokens
    lengths = per_layer_lengths([6, 2], model.config.num_hidden_layers)
    cache = reasoncache.ReasonCache.from_demonstrations(model, ids, layer_lengths=lengths, keep_last=6)
    assert cache.prefix_len == 6 and cache.layer_lengths == tuple(lengths)
    tail = reasoncache.ReasonCache.from_demonstrations(model, ids[:, -6:], layer_lengths=lengths)
    torch.testing.assert_close(cache.keys[0], tail.keys[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.values[0], tail.values[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cache.values[1], tail.values[1], atol=1e-3)
    for bad in (0, 21, 2.0):
        with pytest.raises(ValueError, match=r"keep_last must be an int in \[1, 20\]"):
            reasoncache.ReasonCache.from_demonstrations(model, ids, keep_last=bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    model, tok, train, cfg = _setup(steps=4, batch_size=2, grad_accum=1)
    Trainer(model, tok, train, cfg, out, progress=False).train()
    if rank == 0:
        torch.save(model.reasoncache.keys.detach(), os.path.join(out, "keys.pt"))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp" / "keys.pt")
    model, tok, train, cfg = _setup(steps=4, batch_size=2, grad_accum=2)
    Trainer(model, tok, train, cfg, tmp_path / "single", progress=False).train()
    torch.testing.assert_close(ddp, model.reasoncache.keys.detach(), atol=1e-6, rtol=1e-5)


def _fsdp_worker(rank, port, out, checkpointing):
    from torch.distributed.tensor import DTensor

    from reasoncache.app.sharding import shard_frozen_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    model, tok, train, cfg = _setup(steps=4, batch_size=2, grad_accum=1, gradient_checkpointing=checkpointing)
    torch.distributed.init_process_group("gloo")
    full = model.model.layers[0].self_attn.q_proj.weight.shape
    shard_frozen_model(model, "cpu")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, DTensor) and w.to_local().shape[0] == full[0] // 2, "decoder layers are sharded in two"
    assert not isinstance(model.reasoncache.keys, DTensor), "the prefix stays whole on every process"
    cfg.eval_limit, cfg.max_new_tokens = 2, 3  # evaluation: every process generates together
    history = Trainer(model, tok, train, cfg, out, eval_examples=train[:2], progress=False).train()
    if rank == 0:
        torch.save({"keys": model.reasoncache.keys.detach(), "history": history}, os.path.join(out, "run.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_fsdp_sharded_frozen_model_equals_one_process_with_the_same_global_batch(tmp_path, checkpointing):
    """Two gloo processes with FSDP2-sharded decoder layers take the same steps (losses and
    prefix) as one unsharded process with their global batch."""
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path / "fsdp"), checkpointing), nprocs=2, join=True)
    run = torch.load(tmp_path / "fsdp" / "run.pt", weights_only=False)
    model, tok, train, cfg = _setup(steps=4, batch_size=2, grad_accum=2)
    single = Trainer(model, tok, train, cfg, tmp_path / "single", progress=False).train()
    torch.testing.assert_close(run["keys"], model.reasoncache.keys.detach(), atol=1e-6, rtol=1e-5)
    losses = lambda h: [r["loss"] for r in h if "loss" in r]
    assert losses(run["history"]) == pytest.approx(losses(single), rel=1e-5)
    assert any("eval_accuracy" in r for r in run["history"])
    assert (tmp_path / "fsdp" / CHECKPOINT).is_file()
    saved = torch.load(tmp_path / "fsdp" / CHECKPOINT, weights_only=False)
    assert set(saved["trainable"]) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_fsdp_refuses_what_it_cannot_shard():
    from reasoncache.app.sharding import decoder_layers, shard_frozen_model

    model = tiny_model("llama")
    assert len(decoder_layers(model)) == 2
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="torchrun"):
        shard_frozen_model(model, "cpu")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_suspended_is_the_frozen_base_model(arch):
    """The distillation teacher: a patched model with its prefix (and GPT-2's position
    offset) suspended computes exactly what the unpatched model does, and the patch is
    whole again after the block."""
    from reasoncache.hf import prefix_suspended

    model = tiny_model(arch)
    ids = torch.randint(3, 90, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        reasoncache.patch(model, reasoncache.ReasonCache.for_model(model, prefix_len=5))
        patched = model(ids).logits
        with prefix_suspended(model):
            suspended = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(suspended, base, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(patched, base, atol=1e-3)
    assert torch.equal(again, patched)


def test_distill_starts_at_zero_from_the_teachers_own_demonstrations(tmp_path):
    """With the prefix built from exactly the teacher's demonstration text, the student on
    the question alone equals the teacher shown the demonstrations: KL 0 at step 0. Then it
    trains the prefix only."""
    from reasoncache.app.data import format_prompt
    from reasoncache.app.trainer import distill_loss

    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("two_quantities", 12, 0, seed=0)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, objective="distill", distill_shots=2, checkpoint_every=3)
    reasoncache.patch(model, reasoncache.ReasonCache.for_model(model, prefix_len=4))  # replaced below
    trainer = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    student = format_prompt(tok, train[0].prompt)
    teacher = format_prompt(tok, train[0].prompt, shots=trainer.demos)
    assert teacher.endswith(student)
    demo_ids = torch.tensor([tok(teacher[: -len(student)], add_special_tokens=False).input_ids])
    reasoncache.patch(model, reasoncache.ReasonCache.from_demonstrations(model, demo_ids))
    trainer = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    batch, teacher_batch = trainer._collate(trainer.encoded, [0, 1, 2]), trainer._collate(trainer.teacher, [0, 1, 2])
    kl, n = distill_loss(model, batch, teacher_batch)
    assert n > 10 and abs(kl.item()) / n < 1e-5
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    hist = trainer.train()
    assert all(r["loss"] >= -1e-6 for r in hist if "loss" in r)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("reasoncache.") for k in changed)


def test_distill_config_errors():
    with pytest.raises(ValueError, match="objective must be one of"):
        TrainConfig(objective="kl").check()
    with pytest.raises(ValueError, match="distill_shots must be a positive int"):
        TrainConfig(objective="distill", distill_shots=0).check()
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 4, 0)
    reasoncache.patch(model, build_cache(model, tok, train, prefix_len=4))
    with pytest.raises(ValueError, match="distill_shots=5 needs as many examples, got 4"):
        Trainer(model, tok, train, TrainConfig(objective="distill", distill_shots=5), "/tmp/unused", progress=False)


def test_report_to_tensorboard_logs_every_row(tmp_path, monkeypatch):
    from reasoncache.app import trainer as trainer_mod

    written = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

    monkeypatch.setattr(trainer_mod, "tensorboard_writer", lambda log_dir: FakeWriter())
    model, tok, train, cfg = _setup(steps=2, report_to="tensorboard")
    Trainer(model, tok, train, cfg, tmp_path, progress=False).train()
    assert ("loss", 1) in written and ("loss", 2) in written and ("lr", 2) in written
    with pytest.raises(ValueError, match="report_to must be None or 'tensorboard'"):
        TrainConfig(report_to="wandb").check()


def test_packed_micro_batches_train_like_padded_ones(tmp_path):
    """Packing (on by default) puts a micro-batch's examples in one row without padding;
    the losses and the final prefix equal the padded run's."""
    runs = {}
    for packing in (True, False):
        model, tok, train, cfg = _setup(steps=4, batch_size=3, packing=packing)
        trainer = Trainer(model, tok, train, cfg, tmp_path / str(packing), progress=False)
        assert trainer.packing is packing
        batch = trainer._collate(trainer.encoded, trainer._micro_batch(0))
        assert batch["input_ids"].shape[0] == (1 if packing else 3)
        runs[packing] = ([r["loss"] for r in trainer.train()], model.reasoncache.keys.detach().clone())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-6, rtol=1e-5)


def test_packing_is_checked_and_refused_where_examples_would_see_each_other(tmp_path, monkeypatch):
    """If the packed row does not keep the examples apart (here: position ids that do not
    restart, so nothing marks the boundaries), the trainer says so and pads instead."""
    from reasoncache.app import data
    from reasoncache.app import trainer as trainer_mod

    real = data.collate_packed

    def no_restarts(batch, pad_id):
        rows = real(batch, pad_id)
        rows["position_ids"] = torch.arange(rows["input_ids"].shape[1])[None]
        return rows

    monkeypatch.setattr(trainer_mod, "collate_packed", no_restarts)
    model, tok, train, cfg = _setup(steps=1, batch_size=3)
    with pytest.warns(RuntimeWarning, match="training with padding instead"):
        t = Trainer(model, tok, train, cfg, tmp_path, progress=False)
    assert not t.packing


def test_lora_baseline_packs_exactly_too(tmp_path):
    """An unpatched model (a PEFT LoRA on SDPA attention) trains packed as well: transformers
    builds the block-diagonal mask from the position ids when no cache is in use."""
    peft = pytest.importorskip("peft")
    model, tok = tiny_model("llama"), tiny_tokenizer()
    train, _ = make_split("arithmetic", 12, 0, seed=0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    cfg = TrainConfig(steps=1, batch_size=3, lr=1e-3)
    assert Trainer(lora, tok, train, cfg, tmp_path, progress=False).packing


def test_the_log_holds_the_gradient_norm_before_clipping(tmp_path):
    """Each step's row has the global gradient norm the optimizer got before clipping: the
    same with and without clipping, and what an unclipped step hands the optimizer."""
    handed, logged = {}, {}
    for clip in (0.0, 1e-3):
        model, tok, train, cfg = _setup(steps=1, max_grad_norm=clip)
        t = Trainer(model, tok, train, cfg, tmp_path / str(clip), progress=False)

        def hook(opt, args, kwargs, clip=clip):
            grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"]]
            handed[clip] = torch.cat(grads).norm().item()

        t.opt.register_step_pre_hook(hook)
        logged[clip] = next(r for r in t.train() if "loss" in r)["grad_norm"]
    assert logged[0.0] == pytest.approx(logged[1e-3], rel=1e-5) and logged[0.0] > 1e-2
    assert handed[0.0] == pytest.approx(logged[0.0], rel=1e-5)
    assert handed[1e-3] == pytest.approx(1e-3, rel=1e-3)
