"""Greedy generation and exact-match accuracy."""

from __future__ import annotations

import re
import time
from decimal import Decimal, InvalidOperation

import torch

from .._checks import is_int_at_least
from .data import Example, format_prompt

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def check_answer_pattern(pattern: str | None) -> None:
    """Refuse an ``answer_pattern`` that is not a regular expression before any generation
    or training runs (it is first used when the model is evaluated, at the end)."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"answer_pattern {pattern!r} is not a valid regular expression: {e}") from None


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The answer in a generation: ``pattern``'s last match (its first group if it has
    one), else the text after the last ``####``, else the last number."""
    if pattern:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.split()[0] if tail else None
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def normalize(ans: str | None) -> str | None:
    """The form answers are compared in: ``None`` stays ``None``; numbers lose commas, a trailing
    period, a leading dollar sign and a zero fraction (``"$1,024.0"`` -> ``"1024"``), exactly
    (decimal, so two integers past 2**53 stay apart); anything else is lower-cased."""
    if ans is None:
        return None
    ans = ans.strip().rstrip(".").replace(",", "")
    try:
        x = Decimal(ans.removeprefix("$"))
    except InvalidOperation:
        return ans.lower()
    if not x.is_finite():  # "inf", "nan": compared as words
        return ans.lower()
    if x == 0:
        return "0"  # not "-0"
    if x == x.to_integral_value():
        return format(x.to_integral_value(), "f")  # not str(int(x)): "1e5000" would pass int's str limit
    return format(x.normalize(), "f")


def gold_answers(examples: list[Example], answer_pattern: str | None = None) -> list[str]:
    """The normalized answer of every example (its ``answer``, else found in its completion as
    ``extract_answer`` finds one). Raises for no examples, or for an example with no answer to
    find: it would count as wrong whatever the model wrote. Cheap: run it before any model work."""
    check_answer_pattern(answer_pattern)
    if not examples:
        raise ValueError("evaluation needs at least one example")
    golds = [
        normalize(e.answer if e.answer is not None else extract_answer(e.completion, answer_pattern)) for e in examples
    ]
    missing = [e for e, g in zip(examples, golds) if g is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(examples)} examples have no answer to compare with (the first: "
            f"{missing[0].source or repr(missing[0].prompt[:60])}): no 'answer' field, and its completion has "
            "no '####' and no number" + (" matching answer_pattern" if answer_pattern else "")
            + "; give each row an 'answer', or an answer_pattern (--answer-pattern) that finds it"
        )  # fmt: skip
    return golds


def _check_lengths(max_new_tokens, batch_size) -> None:
    for name, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not is_int_at_least(v, 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "generating",
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy completions of already formatted ``prompts`` (left-padded batches).
    ``synced_gpus``: every process generates together until all are done (a sharded model
    needs every process in every forward)."""
    from tqdm.auto import tqdm

    _check_lengths(max_new_tokens, batch_size)
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = []
    try:
        for s in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            enc = tok(prompts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                synced_gpus=synced_gpus,
            )
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return outs


def evaluate(
    model,
    tok,
    examples: list[Example],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    chat_template: bool = True,
    shots: list[Example] | None = None,
    answer_pattern: str | None = None,
    progress: bool = False,
    synced_gpus: bool = False,
) -> dict:
    """Exact-match accuracy of greedy generations against each example's answer (or the
    answer extracted from its reference completion). Returns ``accuracy``, ``n``,
    ``prompt_tokens`` (mean prompt length the model saw), ``examples_per_s`` (generation
    throughput) and per-example ``predictions``. ``synced_gpus``: as in ``generate``."""
    _check_lengths(max_new_tokens, batch_size)
    golds = gold_answers(examples, answer_pattern)
    prompts = [format_prompt(tok, e.prompt, chat_template, shots) for e in examples]
    t0 = time.perf_counter()
    texts = generate(model, tok, prompts, max_new_tokens, batch_size, progress, "evaluating", synced_gpus)
    seconds = time.perf_counter() - t0
    preds, correct = [], 0
    for e, text, gold in zip(examples, texts, golds):
        pred = normalize(extract_answer(text, answer_pattern))
        ok = pred is not None and pred == gold
        correct += ok
        preds.append({"prompt": e.prompt, "generation": text, "prediction": pred, "answer": gold, "correct": ok})
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    return {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "prompt_tokens": sum(lengths) / len(lengths),
        "examples_per_s": len(examples) / seconds if seconds > 0 else None,
        "predictions": preds,
    }
