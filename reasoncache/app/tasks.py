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


_UNITS = [  # (from, to, factor): integer conversions, so answers are exact
    ("meters", "centimeters", 100), ("kilometers", "meters", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("feet", "inches", 12), ("days", "hours", 24), ("kilograms", "grams", 1000),
]  # fmt: skip


def unit_conversion(rng: random.Random) -> Example:
    """'How many minutes are 3 hours and 25 minutes?' -> '3 hours = 3 * 60 = 180 minutes.
    180 + 25 = 205. #### 205'."""
    big, small, f = rng.choice(_UNITS)
    a, b = rng.randint(2, 12), rng.randint(1, f - 1)
    steps = f"{a} {big} = {a} * {f} = {a * f} {small}. {a * f} + {b} = {a * f + b}."
    return Example(f"How many {small} are {a} {big} and {b} {small}?", f"{steps} #### {a * f + b}", str(a * f + b))


_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def day_of_week(rng: random.Random) -> Example:
    """'Today is Tuesday. What day of the week is it in 17 days?' -> '17 = 2 * 7 + 3. Three
    days after Tuesday is Friday. #### Friday'. The answer is a word."""
    d, n = rng.randrange(7), rng.randint(3, 400)  # 7 x 398 distinct prompts: enough for the 1,000 of a study run
    weeks, rest = divmod(n, 7)
    day = _DAYS[(d + rest) % 7]
    steps = f"{n} = {weeks} * 7 + {rest}. {rest} days after {_DAYS[d]} is {day}."
    return Example(f"Today is {_DAYS[d]}. What day of the week is it in {n} days?", f"{steps} #### {day}", day)


_ITEMS = ["apple", "pear", "plum", "fig", "kiwi"]


def count_items(rng: random.Random) -> Example:
    """'How many times does "plum" appear in: fig, plum, apple, plum, kiwi, plum?' -> a
    running count over the matches. #### 3'."""
    target = rng.choice(_ITEMS)
    items = [rng.choice(_ITEMS) for _ in range(rng.randint(5, 9))]
    count, steps = 0, []
    for i, it in enumerate(items, 1):
        if it == target:
            count += 1
            steps.append(f"item {i} is {target}, count {count}.")
    body = " ".join(steps) if steps else f"no item is {target}."
    prompt = f'How many times does "{target}" appear in: {", ".join(items)}?'
    return Example(prompt, f"{body} #### {count}", str(count))


def compare_sums(rng: random.Random) -> Example:
    """'Which is larger, 37 + 48 or 29 + 61? Answer with the larger sum.' -> '37 + 48 = 85.
    29 + 61 = 90. 90 > 85. #### 90'."""
    a, b, c, d = (rng.randint(10, 99) for _ in range(4))
    x, y = a + b, c + d
    if x == y:
        d += 1
        y += 1
    big = max(x, y)
    cmp = f"{max(x, y)} > {min(x, y)}."
    prompt = f"Which is larger, {a} + {b} or {c} + {d}? Answer with the larger sum."
    return Example(prompt, f"{a} + {b} = {x}. {c} + {d} = {y}. {cmp} #### {big}", str(big))


_PEOPLE = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay"]


def two_quantities(rng: random.Random) -> Example:
    """A word problem with two quantities: 'Ana has 4 boxes of 6 pencils and gives away 9
    pencils. How many pencils does Ana have left?' -> '4 * 6 = 24. 24 - 9 = 15. #### 15'."""
    who = rng.choice(_PEOPLE)
    boxes, per = rng.randint(2, 9), rng.randint(3, 12)
    give = rng.randint(1, boxes * per - 1)
    total = boxes * per
    prompt = (
        f"{who} has {boxes} boxes of {per} pencils and gives away {give} pencils. "
        f"How many pencils does {who} have left?"
    )
    return Example(prompt, f"{boxes} * {per} = {total}. {total} - {give} = {total - give}. #### {total - give}",
                   str(total - give))  # fmt: skip


def mean_of_three(rng: random.Random) -> Example:
    """'What is the average of 12, 18 and 27?' -> '12 + 18 = 30. 30 + 27 = 57. 57 / 3 = 19.
    #### 19'. Added after the recipe study as a family nobody tuned on: two additions, then
    a division (the third number is nudged so that the sum divides by 3)."""
    a, b, c = rng.randint(10, 60), rng.randint(10, 60), rng.randint(10, 60)
    c += -(a + b + c) % 3
    total = a + b + c
    steps = f"{a} + {b} = {a + b}. {a + b} + {c} = {total}. {total} / 3 = {total // 3}."
    return Example(f"What is the average of {a}, {b} and {c}?", f"{steps} #### {total // 3}", str(total // 3))


_RANKS = ["smallest", "second smallest", "middle", "second largest", "largest"]


def rank_in_list(rng: random.Random) -> Example:
    """'Which number is the second smallest of 41, 17, 88, 23, 65?' -> 'In order: 17, 23, 41,
    65, 88. The second smallest is 23. #### 23'. Added with the study finished, as a second
    family nobody tuned on, and of another shape: ordering, no arithmetic."""
    nums = rng.sample(range(10, 100), 5)
    k = rng.randrange(5)
    order = sorted(nums)
    prompt = f"Which number is the {_RANKS[k]} of {', '.join(map(str, nums))}?"
    body = f"In order: {', '.join(map(str, order))}. The {_RANKS[k]} is {order[k]}."
    return Example(prompt, f"{body} #### {order[k]}", str(order[k]))


_EVENTS = ["A film", "A train trip", "A meeting", "A football match", "A cooking class"]


def clock_time(rng: random.Random) -> Example:
    """'A film starts at 9:40 and lasts 2 hours and 35 minutes. When does it end?' -> '40 + 35 =
    75 minutes = 1 hour and 15 minutes. 9 + 2 + 1 = 12. #### 12:15'. Added with the study
    finished, as a third family nobody tuned on: adding in base 60 with a carry, a 24-hour
    clock answer (``H:MM``)."""
    h, m = rng.randint(6, 14), rng.randrange(60)
    dh, dm = rng.randint(1, 5), rng.randrange(5, 60, 5)
    total = m + dm
    if total >= 60:
        steps = f"{m} + {dm} = {total} minutes = 1 hour and {total - 60} minutes. {h} + {dh} + 1 = {h + dh + 1}."
    else:
        steps = f"{m} + {dm} = {total} minutes. {h} + {dh} = {h + dh}."
    end = f"{h + dh + total // 60}:{total % 60:02d}"
    hours = "1 hour" if dh == 1 else f"{dh} hours"
    prompt = f"{rng.choice(_EVENTS)} starts at {h}:{m:02d} and lasts {hours} and {dm} minutes. When does it end?"
    return Example(prompt, f"{steps} #### {end}", end)


def next_in_sequence(rng: random.Random) -> Example:
    """'What number comes next: 5, 12, 19, 26?' -> '12 - 5 = 7, so each number is 7 more. 26 +
    7 = 33. #### 33'; or going down: '47 - 41 = 6, so each number is 6 less. 29 - 6 = 23.
    #### 23'. Added with the study finished, as a fourth family nobody tuned on: find the
    step of an arithmetic sequence from its first two terms, then take one more step."""
    d = rng.randint(2, 19)
    if rng.random() < 0.5:
        start = rng.randint(2, 60)
        terms = [start + i * d for i in range(5)]
        steps = f"{terms[1]} - {terms[0]} = {d}, so each number is {d} more. {terms[3]} + {d} = {terms[4]}."
    else:
        start = rng.randint(4 * d + 1, 4 * d + 60)  # the fifth term, the answer, stays positive
        terms = [start - i * d for i in range(5)]
        steps = f"{terms[0]} - {terms[1]} = {d}, so each number is {d} less. {terms[3]} - {d} = {terms[4]}."
    prompt = f"What number comes next: {', '.join(map(str, terms[:4]))}?"
    return Example(prompt, f"{steps} #### {terms[4]}", str(terms[4]))


TASKS = {
    "arithmetic": arithmetic_chain,
    "digit_sum": digit_sum,
    "unit_conversion": unit_conversion,
    "day_of_week": day_of_week,
    "count_items": count_items,
    "compare_sums": compare_sums,
    "two_quantities": two_quantities,
    "mean_of_three": mean_of_three,
    "rank_in_list": rank_in_list,
    "clock_time": clock_time,
    "next_in_sequence": next_in_sequence,
}


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
