"""The baselines a learned prefix is compared with: the frozen model zero-shot, in-context
learning with K demonstrations in the prompt, and LoRA at a matched parameter count.

``reasoncache eval`` (without ``--cache``, with ``--shots``), the demo, the accuracy study
(``bench quality``) and the training benchmark (``bench train``) all build their
baselines here, so they compare against the same thing.
"""

from __future__ import annotations

from torch import nn

from .data import Example
from .evaluate import evaluate

LORA_MODULES = ("q_proj", "v_proj")


def in_context(model: nn.Module, tok, test: list[Example], shots: list[Example], **eval_kw) -> dict:
    """``evaluate`` with ``shots`` as earlier chat turns before every question (none: the
    zero-shot baseline); adds ``method`` ("zero-shot" or "K-shot ICL") to the result."""
    res = evaluate(model, tok, test, shots=shots, **eval_kw)
    return {"method": f"{len(shots)}-shot ICL" if shots else "zero-shot", **res}


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
