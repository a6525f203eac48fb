"""``ReasonCache``: the learned per-layer key/value prefix of a frozen model."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._checks import is_int_at_least
from ._version import __version__
from .hf.models import ModelShape, fingerprint, model_shape, rotate_keys, text_config, uses_absolute_positions
from .hf.patch import record_keys_values

CONFIG_NAME = "reasoncache_config.json"
WEIGHTS_NAME = "reasoncache.safetensors"


def check_prefix_len(prefix_len: int | Sequence[int]) -> int | tuple[int, ...]:
    """``prefix_len`` checked without a model: an int >= 1 (returned as is), or a sequence of
    per-layer ints >= 0, at least one > 0 (returned as a tuple); else a ValueError naming
    ``prefix_len``. The CLI checks ``--prefix-len`` with it before loading the model."""
    if is_int_at_least(prefix_len, 1):
        return prefix_len
    if isinstance(prefix_len, (str, bytes)) or not isinstance(prefix_len, Sequence):
        raise ValueError(f"prefix_len must be an int >= 1 or a sequence of per-layer ints, got {prefix_len!r}")
    pattern = tuple(prefix_len)
    if not pattern or not all(is_int_at_least(x, 0) for x in pattern) or not any(pattern):
        raise ValueError(f"prefix_len's per-layer lengths must be ints >= 0, at least one > 0, got {prefix_len!r}")
    return pattern


def per_layer_lengths(prefix_len: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Each layer's prefix length, ``num_layers`` ints, from ``prefix_len``: an int gives every
    layer that length; a sequence of ints is repeated over the layers (layer ``i`` gets
    ``prefix_len[i % len(prefix_len)]``), so ``[24, 8]`` alternates 24 and 8 and a list of
    ``num_layers`` lengths gives each layer its own. A length of 0 leaves a layer without a
    prefix; at least one must be > 0. A ValueError names ``prefix_len`` when it is none of these."""
    pattern = check_prefix_len(prefix_len)
    if isinstance(pattern, int):
        return (pattern,) * num_layers
    if len(pattern) > num_layers:
        raise ValueError(f"prefix_len has {len(pattern)} per-layer lengths for a model of {num_layers} layers")
    return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def first_token_keys_values(model: nn.Module, token: Tensor, prefix_len: int) -> tuple[Tensor, Tensor]:
    """Keys and values ``[layers, kv heads, 1, head dim]`` of ``token [1, 1]`` computed alone, as
    a sequence's first token (an attention sink), where a ``prefix_len`` prefix's position 0
    sits: ``-prefix_len``, or ``0`` on absolute-position models."""
    device = next(model.parameters()).device
    first = 0 if uses_absolute_positions(model) else -prefix_len
    return record_keys_values(model, token.to(device), torch.tensor([[first]], device=device))


class ReasonCache(nn.Module):
    """Per-layer prefix keys and values ``[Hkv, P, D]``, shared by every sequence of a batch.

    Keys are stored post-RoPE, as the model's own cache stores them: a query at position
    ``i`` sees prefix key ``p`` as if it sat at position ``p - P`` (demonstrations placed just
    before the input). Build one with ``for_model``, ``from_demonstrations``, ``from_peft``
    or ``from_pretrained``; plug it in with ``reasoncache.patch(model, cache)``.

    Options:
        sink: keep prefix position 0 frozen (an attention sink); the other ``P - 1`` train.
        reparam_hidden: if > 0, learn the prefix through an MLP (Li & Liang's prefix
            tuning): ``prefix = init + MLP(embedding)``, the MLP's last layer starting at zero
            so training starts exactly at ``init``. ``fold()`` turns it back into tensors.
        rms_scaled: learn keys and values in units of their initial root-mean-square per
            layer and KV head (``prefix = scale * theta``, ``scale`` a frozen buffer). An
            optimizer step then moves keys and values by the same *relative* amount,
            though their scales differ by up to 40x (SmolLM2: keys ~2, values 0.05-1.8).
            ``fold()`` multiplies the scale back in.
        layer_lengths: one prefix length per layer, each in ``[0, P]`` with ``P`` (the keys'
            third dimension) the longest: layer ``i`` uses the first ``layer_lengths[i]``
            positions of its ``[Hkv, P, D]`` and 0 leaves it without a prefix. The kept
            positions stay where they are in the longest prefix (keys rotated for positions
            ``-P..``), so a shorter layer's prefix sits further from the input than one built
            at its own length would. ``None`` (the default): ``P`` on every layer.
    """

    def __init__(
        self,
        shape: ModelShape,
        keys: Tensor,
        values: Tensor,
        *,
        sink: bool = False,
        reparam_hidden: int = 0,
        rms_scaled: bool = False,
        model_fingerprint: str | None = None,
        position_offset: int = 0,
        layer_lengths: Sequence[int] | None = None,
    ):
        super().__init__()
        expect = (shape.num_layers, shape.num_kv_heads, keys.shape[2], shape.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if tuple(t.shape) != expect:
                raise ValueError(f"{name} must be [layers, kv heads, P, head dim] = {expect}, got {tuple(t.shape)}")
        if keys.shape[2] < 1:
            raise ValueError("a ReasonCache needs at least one prefix position (P >= 1)")
        if sink and keys.shape[2] < 2:
            raise ValueError("sink=True freezes position 0, so it needs prefix_len >= 2")
        if not is_int_at_least(reparam_hidden, 0):
            raise ValueError(f"reparam_hidden must be an int >= 0 (0: off), got {reparam_hidden!r}")
        P = keys.shape[2]
        if layer_lengths is None:
            layer_lengths = (P,) * shape.num_layers
        lengths = tuple(layer_lengths) if isinstance(layer_lengths, Sequence) else None
        if (
            lengths is None
            or len(lengths) != shape.num_layers
            or not all(is_int_at_least(x, 0) for x in lengths)
            or max(lengths) != P
        ):
            raise ValueError(
                f"layer_lengths must be {shape.num_layers} ints (one per layer) in [0, P={P}], the longest "
                f"equal to P, got {layer_lengths!r}"
            )
        self.shape = shape
        self.prefix_len = P
        self.layer_lengths = lengths
        self.sink = sink
        self.reparam_hidden = int(reparam_hidden)
        self.rms_scaled = bool(rms_scaled)
        self.model_fingerprint = model_fingerprint
        self.position_offset = position_offset
        keys, values = keys.detach().float(), values.detach().float()
        if sink:
            self.register_buffer("sink_keys", keys[:, :, :1].clone())
            self.register_buffer("sink_values", values[:, :, :1].clone())
            keys, values = keys[:, :, 1:], values[:, :, 1:]
        if self.rms_scaled:
            ks = keys.pow(2).mean((2, 3), keepdim=True).sqrt().clamp_min(1e-6)  # [L, Hkv, 1, 1]
            vs = values.pow(2).mean((2, 3), keepdim=True).sqrt().clamp_min(1e-6)
            self.register_buffer("key_scale", ks)
            self.register_buffer("value_scale", vs)
            keys, values = keys / ks, values / vs
        if self.reparam_hidden:
            L, H, P, D = keys.shape
            h = self.reparam_hidden
            self.register_buffer("base_keys", keys.clone())
            self.register_buffer("base_values", values.clone())
            self.embedding = nn.Parameter(torch.randn(P, h) / math.sqrt(h))
            self.mlp = nn.Sequential(nn.Linear(h, h), nn.Tanh())
            self.head_weight = nn.Parameter(torch.zeros(L, h, 2 * H * D))
            self.head_bias = nn.Parameter(torch.zeros(L, 2 * H * D))
        else:
            self.keys = nn.Parameter(keys.clone())
            self.values = nn.Parameter(values.clone())

    # ------------------------------------------------------------------ access
    @property
    def uniform(self) -> bool:
        """Whether every layer has the whole prefix (``layer_lengths`` all ``P``)."""
        return all(x == self.prefix_len for x in self.layer_lengths)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Prefix of layer ``i``: ``(keys, values)``, each ``[Hkv, layer_lengths[i], D]`` fp32
        (``[Hkv, P, D]`` unless the layers have lengths of their own)."""
        k, v = self._whole_layer(i)
        n = self.layer_lengths[i]
        if n < self.prefix_len:
            k, v = k[:, :n], v[:, :n]
        return k, v

    def _whole_layer(self, i: int) -> tuple[Tensor, Tensor]:
        if self.reparam_hidden:
            L, H, P, D = self.base_keys.shape
            delta = self.mlp(self.embedding) @ self.head_weight[i] + self.head_bias[i]  # [P, 2*H*D]
            dk, dv = delta.view(P, 2, H, D).permute(1, 2, 0, 3)
            k, v = self.base_keys[i] + dk, self.base_values[i] + dv
        else:
            k, v = self.keys[i], self.values[i]
        if self.rms_scaled:
            k, v = k * self.key_scale[i], v * self.value_scale[i]
        if self.sink:
            k = torch.cat([self.sink_keys[i], k], dim=1)
            v = torch.cat([self.sink_values[i], v], dim=1)
        return k, v

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All layers: keys and values ``[L, Hkv, P, D]`` each, at the longest length ``P``
        (layer ``i`` uses the first ``layer_lengths[i]`` positions, see ``layer``)."""
        pairs = [self._whole_layer(i) for i in range(self.shape.num_layers)]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    @torch.no_grad()
    def fold(self) -> ReasonCache:
        """Replace the MLP reparametrization and the RMS scaling by the plain tensors they
        produce (in place); the prefix the model sees is unchanged."""
        if not (self.reparam_hidden or self.rms_scaled):
            return self
        k, v = self.tensors()
        if self.sink:
            k, v = k[:, :, 1:], v[:, :, 1:]
        if self.reparam_hidden:
            for name in ("embedding", "head_weight", "head_bias"):
                delattr(self, name)
            del self.mlp, self.base_keys, self.base_values
        if self.rms_scaled:
            del self.key_scale, self.value_scale
        self.keys, self.values = nn.Parameter(k.clone()), nn.Parameter(v.clone())
        self.reparam_hidden, self.rms_scaled = 0, False
        return self

    def num_trainable_parameters(self) -> int:
        """How many scalars training updates (the cache's size in the equal-parameter comparisons):
        with per-layer lengths, only the positions a layer uses (the MLP of ``reparam_hidden``
        serves every position, so it counts whole)."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.reparam_hidden or self.uniform:
            return n
        s, frozen = self.shape, int(self.sink)
        unused = sum((self.prefix_len - frozen) - max(x - frozen, 0) for x in self.layer_lengths)
        return n - 2 * unused * s.num_kv_heads * s.head_dim

    def extra_repr(self) -> str:
        s = self.shape
        lengths = f"P={self.prefix_len}" if self.uniform else f"P per layer={list(self.layer_lengths)}"
        return (
            f"{s.model_type}: {s.num_layers} layers x {s.num_kv_heads} kv heads x {lengths} x "
            f"D={s.head_dim}, sink={self.sink}, reparam_hidden={self.reparam_hidden}, rms_scaled={self.rms_scaled}"
        )

    @staticmethod
    def stack(caches: list[ReasonCache]) -> ReasonCacheBank:
        """A ``ReasonCacheBank`` of ``caches`` (same model and prefix length, else a
        ValueError naming which cache differs and how), for batches whose sequences use
        different skills: patch a model with it and pass ``generate(cache_ids=...)``."""
        return ReasonCacheBank(caches)

    # ------------------------------------------------------------------ building
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        prefix_len: int | Sequence[int] = 64,
        init: str = "random",
        *,
        seed: int = 0,
        sink: bool = False,
        reparam_hidden: int = 0,
        rms_scaled: bool = False,
    ) -> ReasonCache:
        """A fresh prefix for ``model``: ``prefix_len`` positions on every layer, or per-layer
        lengths (a sequence repeated over the layers, see ``per_layer_lengths``).

        ``init="random"``: position 0 is a sequence-first token (a random token's keys and
        values computed alone: the attention sink every prefix needs, bench/results/quality.md)
        and the other positions Gaussian, with the mean and spread the model's own keys and
        values have in each layer, head and dimension (measured on one forward pass over random
        tokens). On SmolLM2's arithmetic it starts at completion loss 1.36 before training (1.2
        with no prefix, 1.05 from ``build_cache``'s answers; the previous version of this init,
        one Gaussian scale per layer and no sink, started at 8.0). ``init="tokens"``: the
        keys/values of ``P`` random vocabulary tokens placed before the input (``P`` the
        longest length; a shorter layer keeps the first of them).
        """
        shape = model_shape(model)
        lengths = per_layer_lengths(prefix_len, shape.num_layers)
        prefix_len = max(lengths)
        if init not in ("random", "tokens"):
            raise ValueError(f"init must be 'random' or 'tokens' (or use from_demonstrations), got {init!r}")
        g = torch.Generator().manual_seed(seed)
        vocab = text_config(model).vocab_size
        device = next(model.parameters()).device
        if init == "tokens":
            ids = torch.randint(vocab, (1, prefix_len), generator=g).to(device)
            return cls.from_demonstrations(
                model, ids, sink=sink, reparam_hidden=reparam_hidden, rms_scaled=rms_scaled, layer_lengths=lengths
            )
        probe = torch.randint(vocab, (1, 64), generator=g).to(device)
        k, v = record_keys_values(model, probe, torch.arange(probe.shape[1], device=device)[None])
        k0, v0 = first_token_keys_values(model, probe[:, :1], prefix_len)  # the sink
        size = (shape.num_layers, shape.num_kv_heads, prefix_len - 1, shape.head_dim)

        def sample(t: Tensor) -> Tensor:  # [L, H, 63, D] (the probe after its first token) -> [L, H, P - 1, D]
            t = t.cpu()
            return t.mean(2, keepdim=True) + t.std(2, keepdim=True) * torch.randn(size, generator=g)

        keys = torch.cat([k0.cpu(), sample(k[:, :, 1:])], 2)
        values = torch.cat([v0.cpu(), sample(v[:, :, 1:])], 2)
        return cls(
            shape,
            keys,
            values,
            sink=sink,
            reparam_hidden=reparam_hidden,
            rms_scaled=rms_scaled,
            model_fingerprint=fingerprint(model),
            position_offset=0,
            layer_lengths=lengths,
        ).to(device)

    @classmethod
    def from_demonstrations(
        cls,
        model: nn.Module,
        demo_ids: Tensor,
        *,
        sink: bool = False,
        reparam_hidden: int = 0,
        rms_scaled: bool = False,
        layer_lengths: Sequence[int] | None = None,
        keep_last: int | None = None,
    ) -> ReasonCache:
        """The keys and values the model computes for ``demo_ids [1, P]`` placed right before
        its input (positions ``-P..-1``; absolute-position models such as GPT-2 instead see
        the demonstrations at ``0..P-1`` and, once patched, their input shifted by ``P``).
        The patched model then gives the same logits as the unpatched model on
        demonstrations + input: ReasonCACHE's natural initialization. ``layer_lengths``
        (one int per layer, the longest ``P``): layer ``i`` keeps the first
        ``layer_lengths[i]`` demonstration tokens, where they sit among the ``P``.
        ``keep_last``: only the last ``keep_last`` tokens of ``demo_ids [1, N]`` become the
        prefix (``P = keep_last``); the tokens before them are context their keys and values
        were computed with, and are then dropped (still at positions ``-N..-1``, so the kept
        ones sit right before the input). Such a prefix holds no sequence-first token, the
        attention sink the input's own first token stops being once it sees a prefix; on
        SmolLM2 it starts training far worse than one that does (bench/results/quality.md)."""
        if not isinstance(demo_ids, Tensor) or demo_ids.dtype not in (torch.int32, torch.int64):
            got = demo_ids.dtype if isinstance(demo_ids, Tensor) else type(demo_ids).__name__
            raise TypeError(f"demo_ids must be an integer tensor of token ids [1, P], got {got}")
        if demo_ids.dim() != 2 or demo_ids.shape[0] != 1 or demo_ids.shape[1] < 1:
            raise ValueError(
                f"demo_ids must be [1, P] with P >= 1 (one demonstration sequence), got {tuple(demo_ids.shape)}"
            )
        vocab = text_config(model).vocab_size
        if int(demo_ids.min()) < 0 or int(demo_ids.max()) >= vocab:
            raise ValueError(
                f"demo_ids must lie in [0, vocab_size={vocab}), got range "
                f"[{int(demo_ids.min())}, {int(demo_ids.max())}]"
            )
        N = demo_ids.shape[1]
        if keep_last is not None and not (is_int_at_least(keep_last, 1) and keep_last <= N):
            raise ValueError(f"keep_last must be an int in [1, {N}] (demo_ids' length) or None, got {keep_last!r}")
        device = next(model.parameters()).device
        absolute = uses_absolute_positions(model)
        start = 0 if absolute else -N
        pos = torch.arange(start, start + N, device=device)[None]
        k, v = record_keys_values(model, demo_ids.to(device), pos)
        if keep_last is not None:
            k, v = k[:, :, N - keep_last :], v[:, :, N - keep_last :]
        return cls(
            model_shape(model),
            k,
            v,
            sink=sink,
            reparam_hidden=reparam_hidden,
            rms_scaled=rms_scaled,
            model_fingerprint=fingerprint(model),
            position_offset=N if absolute else 0,
            layer_lengths=layer_lengths,
        ).to(device)

    @classmethod
    def from_peft(cls, peft_model, base_model: nn.Module | None = None) -> ReasonCache:
        """Convert a PEFT prefix-tuning model (or a saved PEFT folder, with ``base_model``).

        PEFT places its virtual tokens in the KV cache and shifts the input's positions by
        ``P``; reasoncache keeps the input at ``0..N-1``, so each layer's prefix keys are
        rotated by ``-P`` positions with the model's own rotary embedding (GPT-2-style models
        keep the shift instead). The patched base model then reproduces PEFT's logits."""
        from .hf.peft_convert import peft_prefix

        base, keys, values = peft_prefix(peft_model, base_model)
        P = keys.shape[2]
        absolute = uses_absolute_positions(base)
        if not absolute:
            keys = torch.stack([rotate_keys(base, i, keys[i], -P) for i in range(keys.shape[0])])
        return cls(
            model_shape(base), keys, values, model_fingerprint=fingerprint(base), position_offset=P if absolute else 0
        ).to(keys.device)

    # ------------------------------------------------------------------ compatibility
    def check_compatible(self, model: nn.Module) -> None:
        """Raise ValueError naming every difference between this cache's model and ``model``."""
        diffs = self.shape.differences(model_shape(model))
        if diffs:
            raise ValueError("this ReasonCache was built for another model: " + "; ".join(diffs))
        fp = fingerprint(model)
        if self.model_fingerprint and fp != self.model_fingerprint:
            warnings.warn(
                f"ReasonCache: the model's config fingerprint {fp} differs from the one the cache was built for "
                f"({self.model_fingerprint}); shapes match, so it loads, but check it is the same model",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ saving
    def config_dict(self) -> dict:
        """The cache's metadata as written to ``reasoncache_config.json``: shape, prefix length,
        options and the model fingerprint that ``from_pretrained`` checks."""
        return {
            "format": "reasoncache",
            "reasoncache_version": __version__,
            "model_type": self.shape.model_type,
            "num_layers": self.shape.num_layers,
            "num_kv_heads": self.shape.num_kv_heads,
            "head_dim": self.shape.head_dim,
            "prefix_len": self.prefix_len,
            "layer_lengths": None if self.uniform else list(self.layer_lengths),
            "dtype": "float32",
            "sink": self.sink,
            "reparam_hidden": self.reparam_hidden,
            "rms_scaled": self.rms_scaled,
            "position_offset": self.position_offset,
            "model_fingerprint": self.model_fingerprint,
        }

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``reasoncache.safetensors`` and ``reasoncache_config.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: t.detach().cpu().contiguous() for k, t in self.state_dict().items()}
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, model: nn.Module | None = None, device: str | torch.device | None = None
    ) -> ReasonCache:
        """Load a saved cache; with ``model``, check it fits (a clear error says what differs)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}; is it a folder written by save_pretrained?")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or cfg.get("format") != "reasoncache":
            got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise ValueError(f"{cfg_path} is not a reasoncache config (format={got!r})")
        shape = ModelShape(cfg["model_type"], cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"])
        size = (shape.num_layers, shape.num_kv_heads, cfg["prefix_len"], shape.head_dim)
        cache = cls(
            shape,
            torch.zeros(size),
            torch.zeros(size),
            sink=cfg["sink"],
            reparam_hidden=cfg["reparam_hidden"],
            rms_scaled=cfg.get("rms_scaled", False),
            model_fingerprint=cfg.get("model_fingerprint"),
            position_offset=cfg.get("position_offset", 0),
            layer_lengths=cfg.get("layer_lengths"),
        )
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} holds {CONFIG_NAME} but no {WEIGHTS_NAME}")
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error type for a torn or foreign file
            raise ValueError(f"{weights} cannot be read as safetensors ({e}); was it written completely?") from None
        try:
            cache.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{weights} does not hold what {cfg_path} describes: {e}") from None
        if model is not None:
            cache.check_compatible(model)
            device = device or next(model.parameters()).device
        return cache.to(device) if device is not None else cache


class ReasonCacheBank(nn.Module):
    """Several ``ReasonCache`` of one model and prefix length, so that one batch can use
    different skills: ``layer(i)`` gives banks ``[C, Hkv, P, D]`` and ``cache_ids [B]``
    (set by ``generate(cache_ids=...)`` on a patched model, or ``reasoncache.hf.use_caches``)
    says which cache each sequence uses. Build it with ``ReasonCache.stack``."""

    def __init__(self, caches: list[ReasonCache]):
        super().__init__()
        caches = list(caches)
        if not caches:
            raise ValueError("ReasonCache.stack needs at least one cache")
        bad = [i for i, c in enumerate(caches) if not isinstance(c, ReasonCache)]
        if bad:
            raise TypeError(f"ReasonCache.stack takes ReasonCache objects; entries {bad} are not")
        first = caches[0]
        diffs = []
        for i, c in enumerate(caches[1:], start=1):
            mine, theirs = dataclasses.asdict(c.shape), dataclasses.asdict(first.shape)
            why = [f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
            if c.prefix_len != first.prefix_len:
                why.append(f"prefix_len {c.prefix_len} vs {first.prefix_len}")
            elif c.layer_lengths != first.layer_lengths:
                why.append(f"layer_lengths {list(c.layer_lengths)} vs {list(first.layer_lengths)}")
            if c.position_offset != first.position_offset:
                why.append(f"position_offset {c.position_offset} vs {first.position_offset}")
            if why:
                diffs.append(f"cache {i} differs from cache 0: " + "; ".join(why))
        if diffs:
            raise ValueError("ReasonCache.stack needs caches of the same model and prefix length: " + " | ".join(diffs))
        self.caches = nn.ModuleList(caches)
        self.shape, self.prefix_len, self.position_offset = first.shape, first.prefix_len, first.position_offset
        self.cache_ids: Tensor | None = None

    def __len__(self) -> int:
        return len(self.caches)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Prefix banks of layer ``i``: ``(keys, values)``, each ``[C, Hkv, P, D]`` fp32."""
        pairs = [c.layer(i) for c in self.caches]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def check_compatible(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every cache of the bank fits ``model`` (as ``ReasonCache.check_compatible``)."""
        for c in self.caches:
            c.check_compatible(model)

    def num_trainable_parameters(self) -> int:
        """How many scalars training updates (the cache's size in the equal-parameter comparisons)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f"{len(self.caches)} caches of P={self.prefix_len}"


# build_cache's initializations, the default first (the CLI's --init offers the same)
INITS = ("answers", "demonstrations", "random", "tokens", "turns")


def _assistant_turn(tok, ex) -> str:
    """``ex``'s worked answer as the chat template writes an assistant turn (for ChatML,
    ``<|im_start|>assistant\\n{completion}<|im_end|>\\n``): the text the template adds for the
    answer after the user's turn."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("init='turns' needs a tokenizer with a chat template; use init='answers'")
    user = [{"role": "user", "content": ex.prompt}]
    head = tok.apply_chat_template(user, tokenize=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": ex.completion}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("init='turns': the chat template writes the user's turn differently when an answer follows")
    return full[len(head) :]


def build_cache(
    model: nn.Module,
    tok,
    examples: list,
    prefix_len: int | Sequence[int],
    init: str = "answers",
    *,
    seed: int = 0,
    sink: bool = False,
    reparam_hidden: int = 0,
    rms_scaled: bool = False,
):
    """A ReasonCache to start training from: keys and values ``[layers, kv heads, P, head dim]``
    with ``P = max(prefix_len)`` (a layer with a shorter length uses its first positions).

    ``init="answers"`` (the default): the keys and values of training examples' worked
    answers (plain text, shuffled by ``seed``), cut to ``prefix_len`` tokens, so that a short
    prefix starts from the answer format rather than the first words of a question. Over
    seven task families it averaged 0.011 ± 0.007 higher than ``"demonstrations"`` (question
    and worked answer), see ``bench/results/quality.md``.
    ``examples`` are objects with ``prompt`` and ``completion`` strings
    (``reasoncache.app.data.Example``); ``tok`` is the model's tokenizer.
    ``init="turns"``: the same answers written as the tokenizer's chat template writes an
    assistant turn (for ChatML ``<|im_start|>assistant`` first, the token every chat input
    starts with); it needs a chat template.
    ``"random"`` / ``"tokens"``: see ``ReasonCache.for_model``.
    ``prefix_len``: an int for every layer, or per-layer lengths (a sequence repeated over the
    layers, see ``per_layer_lengths``): the answers are cut to the longest, and a shorter layer
    keeps their first tokens.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    if init in ("random", "tokens"):
        return ReasonCache.for_model(
            model, prefix_len, init, seed=seed, sink=sink, reparam_hidden=reparam_hidden, rms_scaled=rms_scaled
        )
    lengths = per_layer_lengths(prefix_len, model_shape(model).num_layers)
    prefix_len = max(lengths)
    order = list(examples)
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for e in order:
        if init == "turns":
            text = _assistant_turn(tok, e)
        elif init == "answers":
            text = f"{e.completion}\n\n"
        else:  # "demonstrations"
            text = f"{e.prompt}\n{e.completion}\n\n"
        ids += tok(text, add_special_tokens=False).input_ids
        if len(ids) >= prefix_len:
            break
    if len(ids) < prefix_len:
        raise ValueError(f"the training data has only {len(ids)} tokens; prefix_len={prefix_len} needs more")
    demo = torch.tensor([ids[:prefix_len]], device=next(model.parameters()).device)
    return ReasonCache.from_demonstrations(
        model, demo, sink=sink, reparam_hidden=reparam_hidden, rms_scaled=rms_scaled, layer_lengths=lengths
    )
