"""ReasonCache + patch on tiny random models of every supported architecture (CPU, fp32)."""

import dataclasses
import inspect

import pytest
import torch

import reasoncache
from reasoncache import ReasonCache
from tiny_models import ARCHS, VOCAB, tiny_model

P, N = 7, 6


def _ids(*shape, seed=1):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_from_demonstrations_equals_demonstrations_in_the_prompt(arch):
    model = tiny_model(arch)
    demo, query, step = _ids(1, P), _ids(2, N, seed=2), _ids(2, 1, seed=3)
    with torch.no_grad():
        want = model(torch.cat([demo.expand(2, -1), query, step], 1)).logits[:, P:]
        want_gen = model.generate(torch.cat([demo, query[:1]], 1), max_new_tokens=5, do_sample=False)[:, P + N :]
    cache = ReasonCache.from_demonstrations(model, demo)
    assert reasoncache.patch(model, cache) is model
    # A hand-written decode step: the KV cache passed back, no position ids, so an
    # absolute-position model (GPT-2) must read the cache's length under the keyword this
    # transformers uses (`cache` since 5.24, `past_key_values` before).
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(query, use_cache=True)
        got_step = model(step, **{kw: getattr(first, kw)}).logits
        got_gen = model.generate(query[:1], max_new_tokens=5, do_sample=False)[:, N:]
    torch.testing.assert_close(first.logits, want[:, :N], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_step, want[:, N:], atol=2e-5, rtol=1e-4)
    assert torch.equal(got_gen, want_gen)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_sliding_window_layers_match_the_unpatched_model(arch):
    """With an empty prefix the fused path must equal the model's own attention, also
    where sequences are longer than the sliding window (window masking in the op)."""
    model = tiny_model(arch, sliding_window=4)
    ids = _ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        reasoncache.patch(model, None)
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 3:], want[0, 3:], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)


def test_only_the_cache_trains_and_unpatch_restores():
    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    cache = ReasonCache.for_model(model, prefix_len=4)
    reasoncache.patch(model, cache)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["reasoncache.keys", "reasoncache.values"]
    model.train()
    ids = _ids(2, N)
    model(ids, labels=ids).loss.backward()
    assert cache.keys.grad is not None and cache.keys.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("reasoncache"))
    reasoncache.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "reasoncache")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_prefix_gradient(arch):
    model = tiny_model(arch)
    cache = ReasonCache.for_model(model, prefix_len=4, init="tokens")
    reasoncache.patch(model, cache)
    model.train()
    ids = _ids(2, N)
    model(ids, labels=ids).loss.backward()
    plain = cache.keys.grad.clone()
    cache.zero_grad()
    from reasoncache.app.trainer import enable_checkpointing

    enable_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(cache.keys.grad, plain, atol=1e-6, rtol=1e-5)


def test_trains_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    cache = ReasonCache.for_model(model, prefix_len=4)
    reasoncache.patch(model, cache)
    start = cache.keys.detach().clone()
    frozen = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = _ids(16, N)
    data = [{"input_ids": x, "labels": x} for x in ids]
    # transformers renamed gradient_checkpointing (a deprecated alias now); the GPU machine's 5.17 may predate it
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        **{checkpointing: True},
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(cache.keys.detach(), start)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)


@pytest.mark.parametrize("cache_impl", ["dynamic", "static"])
def test_batched_left_padded_generation_equals_each_prompt_alone(cache_impl):
    model = tiny_model("llama")
    reasoncache.patch(model, ReasonCache.from_demonstrations(model, _ids(1, P)))
    a, b = _ids(1, 3, seed=3), _ids(1, 6, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache_impl)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)[:, 6:]
        alone = [model.generate(x, **kw)[:, x.shape[1] :] for x in (a, b)]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1], alone[1][0])


def test_decode_uses_the_shared_prefix_and_never_copies_it(monkeypatch):
    model = tiny_model("llama")
    cache = ReasonCache.from_demonstrations(model, _ids(1, P))
    reasoncache.patch(model, cache)
    import reasoncache.hf.attention as hfa

    calls = []
    real = hfa.prefix_attention

    def spy(q, k, v, pk, pv, **kw):
        calls.append((q.shape[2], pk.shape, k.shape[2]))
        return real(q, k, v, pk, pv, **kw)

    monkeypatch.setattr(hfa, "prefix_attention", spy)
    prompt = _ids(2, N)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    decode = [c for c in calls if c[0] == 1]
    assert decode and all(pk == (2, P, 16) for _, pk, _ in decode)
    # the KV cache holds only the sequences' own tokens, never the P prefix positions
    assert out.past_key_values.get_seq_length() == N + 4 - 1


def test_sampling_generates_valid_tokens():
    model = tiny_model("qwen3")
    reasoncache.patch(model, ReasonCache.for_model(model, prefix_len=3))
    with torch.no_grad():
        out = model.generate(_ids(2, N), max_new_tokens=5, do_sample=True, top_k=10)
    assert out.shape == (2, N + 5) and int(out.max()) < VOCAB


def test_compiled_forward_runs_and_matches():
    model = tiny_model("llama")
    reasoncache.patch(model, ReasonCache.for_model(model, prefix_len=4))
    ids = _ids(2, N)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model("gemma3")
    cache = ReasonCache.for_model(model, prefix_len=5, init="tokens", sink=True)
    cache.save_pretrained(tmp_path)
    loaded = ReasonCache.from_pretrained(tmp_path, model)
    for i in range(2):
        for a, b in zip(cache.layer(i), loaded.layer(i)):
            assert torch.equal(a, b)
    assert (tmp_path / "reasoncache_config.json").is_file() and (tmp_path / "reasoncache.safetensors").is_file()
    import json

    cfg = json.loads((tmp_path / "reasoncache_config.json").read_text())
    assert {
        "model_type",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "prefix_len",
        "dtype",
        "reasoncache_version",
        "model_fingerprint",
    } <= set(cfg)


def test_loading_into_another_model_says_what_differs(tmp_path):
    ReasonCache.for_model(tiny_model("llama"), prefix_len=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type: cache has 'llama', model has 'gpt2'"):
        ReasonCache.from_pretrained(tmp_path, tiny_model("gpt2"))
    with pytest.raises(ValueError, match="num_kv_heads: cache has 2, model has 4"):
        reasoncache.patch(tiny_model("gpt2"), ReasonCache.for_model(tiny_model("llama"), prefix_len=2))


def test_a_damaged_saved_cache_is_refused_naming_the_file(tmp_path):
    """A torn weights file, broken JSON, a missing weights file or weights of another shape
    each raise an error that names the file (the CLI prints it without a traceback)."""
    model = tiny_model("llama")
    ReasonCache.for_model(model, prefix_len=2).save_pretrained(tmp_path / "short")
    ReasonCache.for_model(model, prefix_len=3).save_pretrained(tmp_path / "long")
    weights, config = "reasoncache.safetensors", "reasoncache_config.json"
    (tmp_path / "long" / weights).replace(tmp_path / "short" / weights)  # config says P=2, weights hold P=3
    with pytest.raises(ValueError, match=rf"short/{weights} does not hold what .*short/{config} describes"):
        ReasonCache.from_pretrained(tmp_path / "short")
    (tmp_path / "short" / weights).write_bytes(b"torn")
    with pytest.raises(ValueError, match=rf"short/{weights} cannot be read as safetensors"):
        ReasonCache.from_pretrained(tmp_path / "short")
    (tmp_path / "short" / weights).unlink()
    with pytest.raises(FileNotFoundError, match=f"short holds {config} but no {weights}"):
        ReasonCache.from_pretrained(tmp_path / "short")
    (tmp_path / "short" / config).write_text("{torn")
    with pytest.raises(ValueError, match=f"short/{config} is not valid JSON"):
        ReasonCache.from_pretrained(tmp_path / "short")
    (tmp_path / "short" / config).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"is not a reasoncache config \(format='list'\)"):
        ReasonCache.from_pretrained(tmp_path / "short")


def _patch_and_train_two_steps(model, cache):
    """Patch ``model`` with ``cache``, take two AdamW steps on random tokens, return them."""
    reasoncache.patch(model, cache)
    model.train()
    opt = torch.optim.AdamW(cache.parameters(), lr=1e-2)
    ids = _ids(2, N)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return ids


def test_mlp_reparametrization_starts_at_init_trains_and_folds():
    model = tiny_model("llama")
    demo = _ids(1, P)
    plain = ReasonCache.from_demonstrations(model, demo)
    cache = ReasonCache.from_demonstrations(model, demo, reparam_hidden=32)
    for a, b in zip(plain.tensors(), cache.tensors()):
        assert torch.equal(a, b)
    ids = _patch_and_train_two_steps(model, cache)
    with torch.no_grad():
        before = model(ids).logits
        cache.fold()
        after = model(ids).logits
    assert cache.reparam_hidden == 0 and {n for n, _ in cache.named_parameters()} == {"keys", "values"}
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert not torch.equal(cache.keys.detach(), plain.keys.detach())
    for bad in (-1, 2.5):  # -1 used to reach nn.Linear and fail there with a negative dimension
        with pytest.raises(ValueError, match=f"reparam_hidden must be an int >= 0 \\(0: off\\), got {bad}"):
            ReasonCache.from_demonstrations(model, demo, reparam_hidden=bad)


@pytest.mark.parametrize("reparam_hidden", [0, 16])
def test_rms_scaled_prefix_starts_at_init_moves_relatively_saves_and_folds(tmp_path, reparam_hidden):
    model = tiny_model("llama")
    demo = _ids(1, P)
    plain = ReasonCache.from_demonstrations(model, demo)
    cache = ReasonCache.from_demonstrations(model, demo, rms_scaled=True, reparam_hidden=reparam_hidden)
    for a, b in zip(plain.tensors(), cache.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if not reparam_hidden:  # the learned tensors are in units of each layer/head's RMS
        rms = cache.keys.detach().pow(2).mean((2, 3)).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms))
    ids = _patch_and_train_two_steps(model, cache)
    with torch.no_grad():
        before = model(ids).logits
        cache.save_pretrained(tmp_path)
        loaded = ReasonCache.from_pretrained(tmp_path, model)
        for a, b in zip(cache.tensors(), loaded.tensors()):
            assert torch.equal(a, b)
        cache.fold()
        after = model(ids).logits
    assert not cache.rms_scaled and cache.reparam_hidden == 0 and not hasattr(cache, "key_scale")
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_sink_position_stays_frozen():
    model = tiny_model("llama")
    cache = ReasonCache.for_model(model, prefix_len=4, init="tokens", sink=True)
    first = cache.layer(0)[0][:, :1].clone()
    reasoncache.patch(model, cache)
    model.train()
    opt = torch.optim.AdamW(cache.parameters(), lr=1e-1, weight_decay=0.5)
    ids = _ids(2, N)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(cache.layer(0)[0][:, :1], first) and cache.layer(0)[0].shape[1] == 4
    assert cache.num_trainable_parameters() == 2 * 2 * 2 * 3 * 16


def test_random_init_starts_with_a_sink_and_the_model_s_own_key_value_statistics():
    """init="random": position 0 is the probe's first token computed alone (a sequence-first
    token: its values see only itself, so they match a lone token's wherever it sits), and the
    other positions are drawn around the model's own per-dimension key/value means; P=1 is only
    the sink."""
    from reasoncache.hf.patch import record_keys_values

    model = tiny_model("llama")
    cache = ReasonCache.for_model(model, prefix_len=48, init="random", seed=2)
    g = torch.Generator().manual_seed(2)
    probe = torch.randint(model.config.vocab_size, (1, 64), generator=g)
    lone = ReasonCache.from_demonstrations(model, probe[:, :1])
    torch.testing.assert_close(cache.values[:, :, :1], lone.values)
    k, v = record_keys_values(model, probe, torch.arange(64)[None])
    for got, real in ((cache.keys, k), (cache.values, v)):
        mean, spread = real[:, :, 1:].mean(2), real[:, :, 1:].std(2)
        # 47 draws per dimension: their mean lies within a few standard errors of the model's
        assert ((got[:, :, 1:].mean(2) - mean).abs() <= 4 * spread / 47**0.5 + 1e-6).float().mean() > 0.99
    assert ReasonCache.for_model(model, prefix_len=1, init="random").prefix_len == 1


def test_per_layer_lengths_cut_each_layer_train_only_what_is_used_and_round_trip(tmp_path):
    """``prefix_len`` as per-layer lengths: layer ``i`` uses the first ``lengths[i]`` positions
    of the longest prefix; only those train and count; saving, loading and stacking keep the
    lengths; a length of 0 leaves the layer as the unpatched model's."""
    from reasoncache.cache import per_layer_lengths

    assert per_layer_lengths(16, 3) == (16, 16, 16)
    assert per_layer_lengths([24, 8], 5) == (24, 8, 24, 8, 24)
    assert per_layer_lengths((1, 2, 3), 3) == (1, 2, 3)
    for bad, why in (
        (0, "an int >= 1 or a sequence"),
        ("16", "an int >= 1 or a sequence"),
        ([0, 0], "at least one > 0"),
        ([2, -1], "ints >= 0"),
        ([True, 2], "ints >= 0"),
        ([1, 2, 3], "3 per-layer lengths for a model of 2 layers"),
    ):
        with pytest.raises(ValueError, match=why):
            per_layer_lengths(bad, 2)
    model = tiny_model("llama")
    full = ReasonCache.for_model(model, prefix_len=4, init="random", seed=1)
    cache = ReasonCache.for_model(model, prefix_len=[4, 1], init="random", seed=1)
    assert cache.layer_lengths == (4, 1) and not cache.uniform and "P per layer=[4, 1]" in repr(cache)
    torch.testing.assert_close(cache.layer(0), full.layer(0))
    torch.testing.assert_close(cache.layer(1), tuple(t[:, :1] for t in full.layer(1)))
    per_position = full.num_trainable_parameters() // (2 * 4)  # one position of one layer, keys + values
    assert cache.num_trainable_parameters() == per_position * 5
    ids = _ids(2, N)
    reasoncache.patch(model, cache)(ids).logits.sum().backward()
    for g in (cache.keys.grad, cache.values.grad):
        assert g[0].abs().sum() > 0 and g[1, :, :1].abs().sum() > 0 and not g[1, :, 1:].any()
    with torch.no_grad():
        cache.keys[1, :, 1:] += 100.0  # positions layer 1 does not use change nothing
        before = model(ids).logits
    cache.save_pretrained(tmp_path)
    loaded = ReasonCache.from_pretrained(tmp_path, model)
    assert loaded.layer_lengths == (4, 1)
    with torch.no_grad():
        torch.testing.assert_close(reasoncache.patch(model, loaded)(ids).logits, before)
        none = reasoncache.patch(model, None)(ids).logits
        half = ReasonCache.for_model(model, prefix_len=[0, 4], init="random", seed=1)
        lower = reasoncache.patch(model, half)(ids).logits
    assert half.layer(0)[0].shape == (2, 0, half.shape.head_dim) and not torch.allclose(lower, none)
    sink = ReasonCache.for_model(model, prefix_len=[4, 0], init="tokens", sink=True)
    assert sink.num_trainable_parameters() == per_position * 3  # layer 0 trains 3 of 4; layer 1 none
    with pytest.raises(ValueError, match=r"layer_lengths \[4, 1\] vs \[4, 4\]"):
        ReasonCache.stack([full, cache])
    with pytest.raises(ValueError, match=r"layer_lengths must be 2 ints \(one per layer\) in \[0, P=4\]"):
        ReasonCache(full.shape, *full.tensors(), layer_lengths=[2, 1])  # the longest must be P


# ------------------------------------------------------------------ bad input
def test_bad_input_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefix_len must be an int >= 1"):
        ReasonCache.for_model(model, prefix_len=0)
    with pytest.raises(ValueError, match=r"demo_ids must be \[1, P\].*got \(2, 3\)"):
        ReasonCache.from_demonstrations(model, _ids(2, 3))
    with pytest.raises(TypeError, match="demo_ids must be an integer tensor"):
        ReasonCache.from_demonstrations(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="vocab_size=128"):
        ReasonCache.from_demonstrations(model, torch.tensor([[1, 500]]))
    with pytest.raises(TypeError, match="cache must be a reasoncache.ReasonCache"):
        reasoncache.patch(model, "not a cache")
    with pytest.raises(TypeError, match="no attention modules"):
        reasoncache.patch(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="is not patched"):
        reasoncache.unpatch(model)


def test_an_absolute_position_model_says_how_many_tokens_fit_after_the_prefix():
    """GPT-2's 256 positions are shared by the prefix (its position offset) and the input: past
    them, a clear error instead of an embedding IndexError; packed rows whose positions restart
    fit by their positions, not their length."""
    model = tiny_model("gpt2")
    reasoncache.patch(model, ReasonCache.from_demonstrations(model, _ids(1, 250)))
    assert model(_ids(1, 6)).logits.shape[1] == 6
    with pytest.raises(ValueError, match="256 positions .* takes the first 250 .* at most 6 tokens .* reaches 10"):
        model(_ids(1, 10))
    with pytest.raises(ValueError, match="reaches 7"):
        model.generate(_ids(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=0)
    packed = torch.arange(6).repeat(2)[None]  # two segments of 6
    assert model(_ids(1, 12), position_ids=packed).logits.shape[1] == 12


def test_encoders_and_encoder_decoders_are_refused_by_name():
    """A prefix is learned for causal decoders: BERT's bidirectional attention and T5 are
    refused up front (BERT used to fail inside the probe forward, with an index error)."""
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="BertModel's attention is bidirectional"):
        ReasonCache.for_model(bert, prefix_len=4)
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        reasoncache.patch(t5, None)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_from_peft_reproduces_peft_prefix_tuning_logits(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model(arch)
    peft_model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():  # a trained-looking prefix, not the init
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    ids = _ids(2, N)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    cache = ReasonCache.from_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = peft_model.get_base_model()
    reasoncache.patch(base, cache)
    with torch.no_grad():
        got = base(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the same from the saved adapter folder
    fresh = tiny_model(arch)
    again = ReasonCache.from_peft(tmp_path / "adapter", base_model=fresh)
    for a, b in zip(again.tensors(), cache.tensors()):
        torch.testing.assert_close(a, b)


def test_from_peft_rejects_other_adapters():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="prefix-tuning"):
        ReasonCache.from_peft(lora)


@pytest.mark.parametrize("use_cache", [False, True], ids=["mask-finds-segments", "position-ids-find-segments"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "mistral"])
def test_packed_sequences_run_fused_and_equal_each_sequence_alone(arch, use_cache, monkeypatch):
    """Sequences packed into one row with position_ids restarting at 0 (what
    DataCollatorWithFlattening produces) run the fused op on the segments (never the
    explicit-mask fallback), and the logits and the prefix gradient equal those of each
    sequence run alone. Without a cache transformers builds a packed mask, which the mask
    entry reads; with one (the default) it builds plain causal, and the position ids tell."""
    from reasoncache.hf import attention as hf_attention

    model = tiny_model(arch, sliding_window=3 if arch == "mistral" else None)  # mistral: a window inside segments
    reasoncache.patch(model, ReasonCache.for_model(model, prefix_len=4))
    seqs = [_ids(1, n, seed=s) for s, n in ((3, 5), (4, 1), (5, 7))]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]

    def no_fallback(*a, **k):
        raise AssertionError("packed sequences took the explicit-mask path")

    monkeypatch.setattr(hf_attention, "_explicit_mask_attention", no_fallback)
    got = model(packed, position_ids=position_ids, use_cache=use_cache).logits
    got.sum().backward()
    g_packed = model.reasoncache.keys.grad.clone()
    model.reasoncache.keys.grad = None
    want = torch.cat([model(s).logits for s in seqs], 1)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g_packed, model.reasoncache.keys.grad, atol=1e-5, rtol=1e-4)


def test_packed_segments_are_read_only_from_a_block_diagonal_causal_pattern():
    from reasoncache.hf.attention import _packed_segments

    lengths = [2, 3, 1]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    i = torch.arange(6)
    block = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    cu, longest = _packed_segments(block[None, None])
    assert cu.tolist() == [0, 2, 5, 6] and cu.dtype == torch.int32 and longest == 3
    two_rows = torch.stack([block, torch.tril(torch.ones(6, 6, dtype=torch.bool))])[:, None]
    assert _packed_segments(two_rows)[0].tolist() == [0, 2, 5, 6, 12]
    assert _packed_segments(torch.tril(torch.ones(1, 1, 6, 6, dtype=torch.bool))) is None  # not packed
    windowed = block & (i[None, :] > i[:, None] - 2)  # a sliding window inside the segments
    assert _packed_segments(windowed[None, None]) is None
    assert _packed_segments(windowed[None, None], window=2)[0].tolist() == [0, 2, 5, 6]
    custom = block.clone()
    custom[4, 3] = False  # a hole in a segment
    assert _packed_segments(custom[None, None]) is None


def test_a_bank_of_caches_generates_each_prompt_with_its_own_cache():
    """ReasonCache.stack + generate(cache_ids=...): a batch of prompts using different
    caches equals generating each prompt with its cache alone; forward under use_caches
    equals each cache's own forward, and the prefix gradient reaches only the caches used."""
    model = tiny_model("llama")
    caches = [ReasonCache.from_demonstrations(model, _ids(1, P, seed=10 + c)) for c in range(3)]
    prompts = _ids(3, N, seed=4)
    want = []
    for b, c in enumerate([2, 0, 2]):
        reasoncache.patch(model, caches[c])
        with torch.no_grad():
            want.append(model.generate(prompts[b : b + 1], max_new_tokens=5, do_sample=False))
        reasoncache.unpatch(model)
    bank = ReasonCache.stack(caches)
    reasoncache.patch(model, bank)
    with torch.no_grad():
        got = model.generate(prompts, max_new_tokens=5, do_sample=False, cache_ids=[2, 0, 2])
    assert torch.equal(got, torch.cat(want))
    with reasoncache.hf.use_caches(model, [1, 1, 0]):
        logits = model(prompts).logits
    logits.sum().backward()
    assert caches[2].keys.grad.abs().sum() == 0 and caches[1].keys.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass cache_ids="):
        model.generate(prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="say which cache each sequence uses"):
        model(prompts)
    with pytest.raises(ValueError, match=r"cache_ids must lie in \[0, 3\)"):
        model.generate(prompts, max_new_tokens=2, cache_ids=[0, 3, 1])
    reasoncache.unpatch(model)
    assert "generate" not in model.__dict__


def test_stack_says_which_cache_differs():
    model = tiny_model("llama")
    a, b = ReasonCache.for_model(model, prefix_len=4), ReasonCache.for_model(model, prefix_len=5)
    other = ReasonCache.for_model(tiny_model("qwen3"), prefix_len=4)
    with pytest.raises(ValueError, match="cache 1 differs from cache 0: prefix_len 5 vs 4"):
        ReasonCache.stack([a, b])
    with pytest.raises(ValueError, match="cache 1 differs from cache 0: model_type 'qwen3' vs 'llama'"):
        ReasonCache.stack([a, other])
    with pytest.raises(ValueError, match="at least one cache"):
        ReasonCache.stack([])


def test_packed_rows_with_trailing_padding_and_flash_style_kwargs(monkeypatch):
    """Packing mixed with padding (two rows, one padded at its end) equals each sequence
    alone at every real token; the flash-attention keywords that
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds work too; padding
    before real tokens inside a packed sequence is refused, not approximated."""
    from reasoncache.hf import attention as hf_attention

    model = tiny_model("llama")
    reasoncache.patch(model, ReasonCache.for_model(model, prefix_len=4))
    monkeypatch.setattr(hf_attention, "_explicit_mask_attention", lambda *a, **k: pytest.fail("explicit path"))
    a, b, c, d = (_ids(1, n, seed=20 + n) for n in (4, 3, 5, 4))
    ids = torch.stack([torch.cat([a, b, _ids(1, 2, seed=9)], 1)[0], torch.cat([c, d], 1)[0]])
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 7, 8], [0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        alone = [model(x).logits[0] for x in (a, b, c, d)]
    torch.testing.assert_close(got[0, :7], torch.cat(alone[:2]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], torch.cat(alone[2:]), atol=2e-5, rtol=1e-4)

    flat = torch.cat([a, b, c], 1)
    cu = torch.tensor([0, 4, 7, 12], dtype=torch.int32)
    flat_pos = torch.cat([torch.arange(n) for n in (4, 3, 5)])[None]
    with torch.no_grad():
        got = model(flat, position_ids=flat_pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    torch.testing.assert_close(got.logits[0], torch.cat(alone[:3]), atol=2e-5, rtol=1e-4)

    mask_bad = torch.ones_like(ids)
    mask_bad[0, 4] = 0  # a pad before the real tokens of the second packed sequence
    with pytest.raises(ValueError, match="padding before real tokens inside a sequence"):
        model(ids, attention_mask=mask_bad, position_ids=pos)
