"""Sharding a frozen base model over processes with PyTorch's FSDP2 (``fully_shard``).

Prefix tuning trains a few MB beside a frozen model of up to hundreds of GB, so only the
frozen model is worth sharding: each decoder layer becomes one FSDP unit (its weights
all-gathered just before it runs and freed after), the rest (embeddings, final norm, LM
head) sits in the root unit, and the trainable parameters (the ``ReasonCache``) stay
whole on every process, outside FSDP. Their gradients are then plain tensors that the
trainer all-reduces exactly as in data parallelism, so a sharded run takes the same steps
as an unsharded one with the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the modules whose class the model lists
    in ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...), outermost only."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{type(model).__name__} does not name its decoder layer class (_no_split_modules), "
            "so --fsdp cannot tell which modules to shard"
        )
    found, inside = [], set()
    for name, m in model.named_modules():
        if type(m).__name__ in names and not any(name.startswith(p + ".") for p in inside):
            found.append(m)
            inside.add(name)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no module of the classes {sorted(names)}")
    return found


def shard_frozen_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Shard ``model``'s frozen weights over the default process group with ``fully_shard``,
    one unit per decoder layer plus the root; parameters that require grad are left whole
    and unmanaged (``ignored_params``). Sharded weights move to ``device`` (the model may
    be loaded on the CPU first, so no process ever holds it whole on its GPU). Returns the
    same model object.

    Needs an initialised process group (``torchrun``; gloo on CPU, NCCL on GPU) and a model
    whose trainable parameters are all outside the decoder layers' weights, as a patched
    model's ``reasoncache`` prefix is; a trainable weight inside a layer (LoRA) is an error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("--fsdp needs torch.distributed: launch with torchrun")
    device = torch.device(device)
    trainable = {p for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters; patch it with a ReasonCache before sharding")
    layers = decoder_layers(model)
    inside = [n for layer in layers for n, p in layer.named_parameters() if p.requires_grad]
    if inside:
        raise ValueError(
            f"--fsdp shards frozen weights only; decoder layers hold trainable parameters ({inside[:3]}...). "
            "Train a LoRA with plain data parallelism or with transformers.Trainer and accelerate's FSDP"
        )
    cache = model._modules.get("reasoncache")
    if cache is not None:
        cache.to(device)
    for p in trainable:
        p.data = p.data.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for a model that ``fully_shard`` has wrapped: every process must then run each
    forward together (evaluation included)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
