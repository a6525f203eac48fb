"""Demonstration data: JSONL rows, chat formatting, tokenization with completion-only
labels, and length-grouped batches."""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training or test row: ``prompt`` (the question, without chat formatting), ``completion``
    (the worked answer the model learns), ``answer`` (the exact-match target; ``None``: the completion's
    text after ``####``, else its last number) and ``source`` (``file:line``, for error messages)."""

    prompt: str
    completion: str
    answer: str | None = None
    source: str = ""  # "file:line", for error messages


def _bad(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


ROLES = ("system", "user", "assistant")


def parse_row(row, where: str) -> Example:
    """One JSONL row: ``{"prompt", "completion", "answer"?}`` or ``{"messages": [...]}``
    (the last message must be the assistant's: it is the completion; the earlier user and
    assistant messages, joined by newlines, are the prompt; system messages are left out,
    and ``load_jsonl`` says so)."""
    if not isinstance(row, dict):
        raise _bad(where, f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if (
            not isinstance(msgs, list)
            or len(msgs) < 2
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise _bad(where, "'messages' must be a list of >= 2 {role, content} objects with string values")
        odd = sorted({m["role"] for m in msgs} - set(ROLES))
        if odd:
            raise _bad(where, f"message roles must be one of {ROLES}, got {odd}")
        if msgs[-1]["role"] != "assistant":
            raise _bad(
                where, f"the last message must be the assistant's (the completion), got role {msgs[-1]['role']!r}"
            )
        prompt = "\n".join(m["content"] for m in msgs[:-1] if m["role"] != "system")
        return Example(prompt, msgs[-1]["content"], _opt_answer(row, where), where)
    if {"question", "answer"} <= set(row) and not ({"prompt", "completion"} & set(row)):
        raise _bad(
            where,
            "a 'question'/'answer' row is read as GSM8K only when the first row's answer holds '#### N'; "
            "name the fields instead: --prompt-field question --completion-field answer",
        )
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise _bad(where, f"missing or non-string {key!r} (rows need 'prompt' and 'completion', or 'messages')")
    return Example(row["prompt"], row["completion"], _opt_answer(row, where), where)


def _opt_answer(row: dict, where: str) -> str | None:
    ans = row.get("answer")
    if ans is not None and not isinstance(ans, (str, int, float)):
        raise _bad(where, f"'answer' must be a string or number, got {type(ans).__name__}")
    return None if ans is None else str(ans)


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator notes: "48/2 = <<48/2=24>>24"


def mapped_row(row, where: str, prompt_field: str, completion_field: str) -> Example:
    """A row whose prompt and completion live under other names (GSM8K: ``question`` and
    ``answer``). Calculator notes ``<<...>>`` are dropped from the completion, and the
    answer is the text after its last ``####``."""
    if not isinstance(row, dict):
        raise _bad(where, f"expected a JSON object, got {type(row).__name__}")
    for key, flag in ((prompt_field, "--prompt-field"), (completion_field, "--completion-field")):
        if not isinstance(row.get(key), str):
            raise _bad(where, f"missing or non-string {key!r} (named by {flag})")
    completion = _CALCULATOR.sub("", row[completion_field])
    answer = completion.rsplit("####", 1)[1].strip() or None if "####" in completion else None
    return Example(row[prompt_field], completion, answer, where)


def _is_gsm8k_style(row) -> bool:
    return (
        isinstance(row, dict)
        and not ({"prompt", "completion", "messages"} & set(row))
        and isinstance(row.get("question"), str)
        and isinstance(row.get("answer"), str)
        and "####" in row["answer"]
    )


def load_jsonl(path: str | Path, prompt_field: str | None = None, completion_field: str | None = None) -> list[Example]:
    """Read examples; a malformed row fails with its file and line number.

    Rows are ``{"prompt", "completion", "answer"?}`` or ``{"messages": [...]}``. With
    ``prompt_field`` and ``completion_field`` (both or neither) the prompt and completion are
    read from those keys instead (see ``mapped_row``). A file whose first row has neither
    layout but GSM8K's ``{"question", "answer"}`` with a ``#### N`` answer is read that way,
    and a line on stderr says so.
    """
    if (prompt_field is None) != (completion_field is None):
        raise ValueError("--prompt-field and --completion-field go together: name both, or neither")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    out, with_system = [], 0
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (some Windows editors write one) is skipped
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(where, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not out and prompt_field is None and _is_gsm8k_style(row):
                prompt_field, completion_field = "question", "answer"
                print(
                    f"{path}: GSM8K-style rows; read 'question' as the prompt and 'answer' as the completion "
                    "(calculator notes <<...>> removed; the answer is the text after '####')",
                    file=sys.stderr,
                )
            if prompt_field is None:
                out.append(parse_row(row, where))
                with_system += "messages" in row and any(m["role"] == "system" for m in row["messages"])
            else:
                out.append(mapped_row(row, where, prompt_field, completion_field))
    if not out:
        raise ValueError(f"{path}: no examples")
    if with_system:
        print(
            f"{path}: {with_system} of {len(out)} rows hold a system message; it is left out of the prompt "
            "(the chat template's own default system turn, if it has one, is used)",
            file=sys.stderr,
        )
    return out


def write_jsonl(path: str | Path, examples: list[Example]) -> None:
    """Write ``examples`` to ``path`` (parents created), one ``{prompt, completion, answer}`` object a line:
    the format ``load_jsonl`` reads back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"prompt": e.prompt, "completion": e.completion, "answer": e.answer}) + "\n")


def format_prompt(tok, prompt: str, chat_template: bool = True, shots: list[Example] | None = None) -> str:
    """The text the model sees before its answer: the tokenizer's chat template when it has
    one (earlier ``shots`` become previous user/assistant turns), else plain text."""
    shots = shots or []
    if chat_template and getattr(tok, "chat_template", None):
        msgs = []
        for s in shots:
            msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.completion}]
        msgs.append({"role": "user", "content": prompt})
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "".join(f"{s.prompt}\n{s.completion}\n\n" for s in shots) + prompt + "\n"


def encode(
    tok, ex: Example, chat_template: bool = True, max_len: int = 1024, shots: list[Example] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt positions ``IGNORE``: loss only on the completion,
    which ends with the end-of-sequence token so the model learns to stop). ``shots`` go
    before the prompt as earlier turns (the distillation teacher's context)."""
    p = tok(format_prompt(tok, ex.prompt, chat_template, shots), add_special_tokens=False).input_ids
    c = tok(ex.completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = (p + c)[:max_len]
    labels = ([IGNORE] * len(p) + c)[:max_len]
    if all(x == IGNORE for x in labels):
        raise ValueError(f"{ex.source or 'example'}: the prompt fills all {max_len} tokens; no completion left")
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B, N]``."""
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The examples back to back in ONE row ``[1, sum of lengths]``: ``input_ids``,
    ``labels`` (each example's first label ``IGNORE``, so no position learns to predict the
    next example) and ``position_ids`` restarting at 0 for every example; no padding and no
    attention mask (transformers and the reasoncache patch read the segments from the
    position ids, as ``DataCollatorWithFlattening`` has them)."""
    ids, labels, pos = [], [], []
    for x, y in batch:
        ids += x
        labels += [IGNORE] + y[1:]
        pos += range(len(x))
    as_row = lambda v: torch.tensor(v, dtype=torch.long)[None]
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(pos)}


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, length_grouped: bool = True
) -> list[list[int]]:
    """One epoch of batches of example indices, a pure function of (seed, epoch), so a
    resumed run sees exactly the batches an uninterrupted one would. With
    ``length_grouped``, examples of similar length share a batch (less padding): a
    shuffled window of 50 batches is sorted by length, cut into batches, and the batches
    shuffled again."""
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if length_grouped:
        window = 50 * batch_size
        idx = [i for s in range(0, len(idx), window) for i in sorted(idx[s : s + window], key=lambda j: lengths[j])]
    batches = [idx[s : s + batch_size] for s in range(0, len(idx) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"{len(lengths)} examples cannot fill one batch of {batch_size}")
    rng.shuffle(batches)
    return batches
