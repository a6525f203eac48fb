"""``patch`` / ``unpatch``: route a Hugging Face decoder's attention through the fused op."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .attention import NAME, register
from .models import attention_modules, text_config

_STATE = "_rc_state"


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # very old transformers
        model.config._attn_implementation = name
    if text_config(model)._attn_implementation != name:
        raise TypeError(f"{type(model).__name__} did not accept attn_implementation={name!r}")


def _check_supported(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise TypeError(
            f"{type(model).__name__}'s attention does not dispatch through transformers' AttentionInterface, "
            "so reasoncache cannot patch it"
        )
    return attention_modules(model)


def _position_offset_hook(offset: int, limit: int | None = None):
    """Shift query positions by ``offset`` (absolute-position models such as GPT-2, whose
    ``limit`` positions the prefix's ``offset`` shares with the input)."""

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if pos is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            x = ids if ids is not None else kwargs["inputs_embeds"]
            past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renamed it `cache`
            start = past.get_seq_length() if past is not None else 0
            pos = torch.arange(start, start + x.shape[1], device=x.device)[None]
            reach = start + x.shape[1]
        else:  # generate's, or packed sequences' (restarting): read them (a sync, on these models only)
            reach = int(pos.max()) + 1 if pos.numel() else 0
        if limit is not None and offset + reach > limit:
            raise ValueError(
                f"the model has {limit} positions and this cache's prefix takes the first {offset} "
                f"(position_offset), so at most {limit - offset} tokens fit after it; this call reaches {reach}"
            )
        kwargs["position_ids"] = pos + offset
        return args, kwargs

    return hook


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def _register_offset(model: nn.Module, offset: int):
    """The position-offset hook on ``model``'s base model (its handle)."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    hook = _position_offset_hook(offset, limit if isinstance(limit, int) else None)
    return _base_model(model).register_forward_pre_hook(hook, with_kwargs=True)


def patch(model: nn.Module, cache: nn.Module | None) -> nn.Module:
    """Make ``model`` attend to ``cache``'s per-layer prefix through the fused op.

    Freezes every base weight, registers ``cache`` as the submodule ``model.reasoncache``
    (so ``model.parameters()`` yields exactly the trainable prefix), switches the model's
    attention implementation to reasoncache's and returns the same model object.
    ``cache=None`` routes attention through the fused op with an empty prefix.
    Calling it on a patched model replaces the previous cache.

    ``cache`` is a ``reasoncache.ReasonCache``, or any ``nn.Module`` with its interface:
    ``layer(i) -> (prefix_k, prefix_v)``, each ``[Hkv, P, D]``, ``check_compatible(model)`` and
    optionally ``position_offset`` (this layer sits below the cache, so it checks the
    interface, not the class).
    """
    methods = ("layer", "check_compatible")
    if cache is not None and not (
        isinstance(cache, nn.Module) and all(callable(getattr(cache, m, None)) for m in methods)
    ):
        raise TypeError(
            f"cache must be a reasoncache.ReasonCache (a module with layer() and check_compatible()) or None, "
            f"got {type(cache).__name__}"
        )
    mods = _check_supported(model)
    if getattr(model, _STATE, None) is not None:
        unpatch(model)
    if cache is not None:
        cache.check_compatible(model)
    register()
    state = {
        "attn": text_config(model)._attn_implementation,
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": [],
    }
    for p in model.parameters():
        p.requires_grad_(False)
    if cache is not None:
        param = next(model.parameters(), None)
        if param is not None:
            cache.to(param.device)
        model.add_module("reasoncache", cache)
        cache.train(model.training)
        offset = getattr(cache, "position_offset", 0)
        if offset:
            state["hooks"].append(_register_offset(model, offset))
    for m in mods:
        object.__setattr__(m, "_rc_cache", cache)
    if cache is not None and hasattr(cache, "cache_ids"):  # a ReasonCacheBank
        object.__setattr__(model, "generate", _generate_with_cache_ids(model, model.generate))
    _set_attn_implementation(model, NAME)
    object.__setattr__(model, _STATE, state)
    return model


def _generate_with_cache_ids(model: nn.Module, generate):
    """``model.generate`` for a model patched with a ReasonCacheBank: it takes
    ``cache_ids`` (one per prompt) and generates every prompt with its cache."""

    def generate_with(*args, cache_ids=None, **kwargs):
        if cache_ids is None:
            raise ValueError(f"this model is patched with a bank of {len(model.reasoncache)} caches: pass cache_ids=")
        if kwargs.get("num_beams", 1) > 1:
            raise ValueError("generate(cache_ids=...) supports greedy decoding and sampling, not num_beams > 1")
        ids = torch.as_tensor(cache_ids).repeat_interleave(kwargs.get("num_return_sequences", 1))
        with use_caches(model, ids):
            return generate(*args, **kwargs)

    generate_with.__doc__ = (generate.__doc__ or "") + "\n\ncache_ids: one cache index per prompt (ReasonCacheBank)."
    return generate_with


@contextlib.contextmanager
def use_caches(model: nn.Module, cache_ids):
    """Within the block, sequence ``b`` of every batch uses cache ``cache_ids[b]`` of the
    ``ReasonCacheBank`` the model is patched with (``cache_ids``: ints ``[B]``)."""
    bank = model._modules.get("reasoncache") if getattr(model, _STATE, None) is not None else None
    if bank is None or not hasattr(bank, "cache_ids"):
        raise ValueError(f"{type(model).__name__} is not patched with a ReasonCacheBank (ReasonCache.stack)")
    device = next(bank.parameters()).device
    ids = torch.as_tensor(cache_ids, device=device)
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
        raise ValueError(f"cache_ids must be a 1-D list or tensor of ints, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < len(bank)):
        raise ValueError(f"cache_ids must lie in [0, {len(bank)}) for a bank of {len(bank)} caches, got {ids.tolist()}")
    previous, bank.cache_ids = bank.cache_ids, ids.long()
    try:
        yield model
    finally:
        bank.cache_ids = previous


@contextlib.contextmanager
def prefix_suspended(model: nn.Module):
    """Within the block a patched model computes as its frozen base model: no prefix and no
    position offset (the fused op still runs, with an empty prefix). The teacher of
    distillation is the same model with its prefix suspended."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by reasoncache")
    mods = attention_modules(model)
    caches = [m.__dict__.get("_rc_cache") for m in mods]
    for m in mods:
        object.__setattr__(m, "_rc_cache", None)
    for h in state["hooks"]:  # the only hooks patch adds: the cache's position offset
        h.remove()
    try:
        yield model
    finally:
        for m, c in zip(mods, caches):
            object.__setattr__(m, "_rc_cache", c)
        offset = getattr(model._modules.get("reasoncache"), "position_offset", 0)
        state["hooks"] = [_register_offset(model, offset)] if offset else []


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original attention implementation and ``requires_grad`` flags, no
    ``model.reasoncache`` submodule. Returns the same model object."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by reasoncache")
    for h in state["hooks"]:
        h.remove()
    for m in attention_modules(model):
        if "_rc_cache" in m.__dict__:
            del m.__dict__["_rc_cache"]
    if "reasoncache" in model._modules:
        del model._modules["reasoncache"]
    model.__dict__.pop("generate", None)  # the cache_ids wrapper of a ReasonCacheBank
    for n, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(n, p.requires_grad))
    _set_attn_implementation(model, state["attn"])
    del model.__dict__[_STATE]
    return model


@contextlib.contextmanager
def _recording(model: nn.Module):
    """Within the block, the model is unpatched except that every attention layer runs the
    fused op with no prefix and stores its (key, value) in the yielded dict."""
    cache = model._modules.get("reasoncache") if getattr(model, _STATE, None) is not None else None
    patched = getattr(model, _STATE, None) is not None
    if patched:
        unpatch(model)
    mods = _check_supported(model)
    register()
    before = text_config(model)._attn_implementation
    record: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in mods:
        object.__setattr__(m, "_rc_recorder", record)
    try:
        _set_attn_implementation(model, NAME)
        yield record
    finally:
        for m in mods:
            del m.__dict__["_rc_recorder"]
        _set_attn_implementation(model, before)
        if patched:
            patch(model, cache)


@torch.no_grad()
def record_keys_values(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """Run ``model`` once on ``input_ids [1, P]`` at ``position_ids [1, P]`` and return every
    layer's post-RoPE keys and values, stacked ``[L, Hkv, P, D]`` each (fp32)."""
    was_training = model.training
    model.eval()
    try:
        with _recording(model) as record:
            model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        model.train(was_training)
    layers = sorted(record)
    keys = torch.stack([record[i][0][0] for i in layers]).float()
    values = torch.stack([record[i][1][0] for i in layers]).float()
    return keys, values
