"""The baselines a learned prefix is compared with: LoRA at a matched parameter count.

The demo, the accuracy study (``bench quality``) and the training benchmark (``bench
train``) all build the equal-parameter LoRA baseline here, so they compare against the
same thing.
"""

from __future__ import annotations

from torch import nn

LORA_MODULES = ("q_proj", "v_proj")


def lora_rank_for(model: nn.Module, target_params: int, modules: tuple[str, ...] = LORA_MODULES) -> int:
    """The LoRA rank on ``modules`` whose parameter count is closest to ``target_params``."""
    per_rank = 0
    for name, m in model.named_modules():
        if name.split(".")[-1] in modules and isinstance(m, nn.Linear):
            per_rank += m.in_features + m.out_features
    if per_rank == 0:
        raise ValueError(f"the model has no {modules} linear layers for LoRA")
    return max(1, round(target_params / per_rank))


def matched_lora(model: nn.Module, target_params: int, modules: tuple[str, ...] = LORA_MODULES):
    """``model`` wrapped with LoRA on ``modules`` at the rank whose parameter count is
    closest to ``target_params`` (alpha = 2 * rank, no dropout).

    Returns ``(peft model, rank, trainable params)``. Needs ``peft`` (the ``[demo]`` extra).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("the LoRA baseline needs peft: pip install 'reasoncache[demo]'") from e

    r = lora_rank_for(model, target_params, modules)
    net = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(modules)))
    return net, r, sum(p.numel() for p in net.parameters() if p.requires_grad)
