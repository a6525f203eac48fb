"""Built-in synthetic reasoning tasks with chain-of-thought completions and exact answers."""

from __future__ import annotations

import random

from .data import Example

_OPS = {
    "add": ("Add {n}", "+", lambda x, n: x + n),
    "sub": ("subtract {n}", "-", lambda x, n: x - n),
    "mul": ("multiply by {n}", "*", lambda x, n: x * n),
}


def arithmetic_chain(rng: random.Random) -> Example:
    """'Start with 7. Add 5, multiply by 3, then subtract 4.' -> '7 + 5 = 12. 12 * 3 = 36.
    36 - 4 = 32. #### 32'. Three operations, intermediate results kept non-negative."""
    x = rng.randint(2, 20)
    words, steps = [], []
    for i in range(3):
        op = rng.choice(["add", "sub", "mul"] if x > 9 else ["add", "mul"])
        n = rng.randint(2, 4) if op == "mul" else rng.randint(2, 9)
        phrase, sym, fn = _OPS[op]
        y = fn(x, n)
        w = phrase.format(n=n)
        words.append(w[0].upper() + w[1:] if i == 0 else w.lower())
        steps.append(f"{x} {sym} {n} = {y}.")
        x = y
    start = steps[0].split()[0]
    prompt = f"Start with {start}. {words[0]}, {words[1]}, then {words[2]}. What number do you get?"
    return Example(prompt, " ".join(steps) + f" #### {x}", str(x))


def digit_sum(rng: random.Random) -> Example:
    """'What is the sum of the digits of 4827?' -> '4 + 8 = 12. 12 + 2 = 14. 14 + 7 = 21.
    #### 21'. Four- or five-digit numbers: reading digits, then a running sum."""
    n = rng.randint(1000, 99999)
    digits = [int(c) for c in str(n)]
    steps, total = [], digits[0]
    for d in digits[1:]:
        steps.append(f"{total} + {d} = {total + d}.")
        total += d
    return Example(f"What is the sum of the digits of {n}?", " ".join(steps) + f" #### {total}", str(total))


TASKS = {"arithmetic": arithmetic_chain, "digit_sum": digit_sum}


def make_split(task: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint train and test sets (no prompt in both), reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {sorted(TASKS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n_train + n_test:
        ex = TASKS[task](rng)
        tries += 1
        if tries > 100 * (n_train + n_test):
            raise ValueError(f"task {task!r} cannot produce {n_train + n_test} distinct examples")
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[:n_train], out[n_train:]
