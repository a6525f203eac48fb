"""Read the learned prefix out of a PEFT prefix-tuning model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _layers_of(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer from a transformers Cache or a legacy tuple of tuples."""
    if hasattr(past, "layers"):  # transformers >= 4.56 Cache
        return [(layer.keys, layer.values) for layer in past.layers]
    if hasattr(past, "key_cache"):
        return list(zip(past.key_cache, past.value_cache))
    return [(kv[0], kv[1]) for kv in past]


@torch.no_grad()
def peft_prefix(peft_model, base_model: nn.Module | None = None):
    """Returns ``(base_model, keys, values)`` with keys/values ``[L, Hkv, P, D]`` fp32 as PEFT
    places them in the cache (i.e. seen from query positions shifted by ``P``)."""
    if isinstance(peft_model, (str, Path)):
        if base_model is None:
            raise ValueError("from_peft(folder) needs base_model=the model the PEFT adapter was trained on")
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(base_model, str(peft_model))
    cfg = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", "default"))
    peft_type = str(getattr(cfg, "peft_type", ""))
    if "PREFIX_TUNING" not in peft_type:
        raise TypeError(f"from_peft needs a PEFT prefix-tuning model, got peft_type={peft_type or type(peft_model)}")
    was_training = peft_model.training
    peft_model.eval()
    try:
        past = peft_model.get_prompt(batch_size=1)
    finally:
        peft_model.train(was_training)
    layers = _layers_of(past)
    keys = torch.stack([k[0] for k, _ in layers]).float()
    values = torch.stack([v[0] for _, v in layers]).float()
    return peft_model.get_base_model(), keys, values
