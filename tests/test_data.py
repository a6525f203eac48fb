"""Data loading, completion-only labels, batching and answer extraction."""

import json
import re

import pytest

from reasoncache.app.data import IGNORE, Example, batch_order, collate, encode, format_prompt, load_jsonl
from reasoncache.app.evaluate import evaluate, extract_answer, normalize
from reasoncache.app.tasks import TASKS, make_split
from tiny_models import tiny_tokenizer


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_rows_of_both_formats(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "1+1?", "completion": "1+1=2. #### 2", "answer": 2}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "#### 4"},
                    ]
                }
            ),
        ],
    )
    a, b = load_jsonl(f)
    assert (a.prompt, a.answer, a.source) == ("1+1?", "2", f"{f}:1")
    assert (b.prompt, b.completion, b.answer, b.source) == ("2+2?", "#### 4", None, f"{f}:3")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"', "invalid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "x"}', "missing or non-string 'completion'"),
        ('{"prompt": "x", "completion": 3}', "non-string 'completion'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "list of >= 2"),
        (
            '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
            "last message must be the assistant's",
        ),
        ('{"prompt": "x", "completion": "y", "answer": [1]}', "'answer' must be a string or number"),
        (
            '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            r"message roles must be one of \('system', 'user', 'assistant'\), got \['bot'\]",
        ),
        ('{"question": "x", "answer": "7"}', "--prompt-field question --completion-field answer"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{message}"):
        load_jsonl(f)


def test_a_byte_order_mark_is_skipped_and_system_messages_are_reported(tmp_path, capsys):
    rows = [
        {"prompt": "1+1?", "completion": "#### 2"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "#### 4"}]},
    ]  # fmt: skip
    f = tmp_path / "bom.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    assert [e.prompt for e in load_jsonl(f)] == ["1+1?", "q"]
    assert "1 of 2 rows hold a system message; it is left out of the prompt" in capsys.readouterr().err


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_loss_only_on_completion_tokens_ending_with_eos():
    tok = tiny_tokenizer()
    ex = Example("What is 2+3?", "2+3=5. #### 5")
    ids, labels = encode(tok, ex, chat_template=True)
    prompt = format_prompt(tok, ex.prompt, True)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert prompt == "U: What is 2+3?\nA: "
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == ex.completion
    plain_ids, _ = encode(tok, ex, chat_template=False)
    assert tok.decode(plain_ids).startswith("What is 2+3?\n")


def test_prompt_longer_than_max_len_is_an_error():
    with pytest.raises(ValueError, match="fills all 8 tokens"):
        encode(tiny_tokenizer(), Example("a long prompt indeed", "x", source="f:3"), max_len=8)


def test_collate_pads_right_and_masks_padding():
    b = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(40)]
    a = batch_order(lengths, 4, seed=1, epoch=0)
    assert a == batch_order(lengths, 4, seed=1, epoch=0)
    assert a != batch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(40))
    spread = lambda order: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in order)
    assert spread(a) < spread(batch_order(lengths, 4, seed=1, epoch=0, length_grouped=False))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        batch_order([3, 4], 4, 0, 0)


@pytest.mark.parametrize(
    "text, pattern, want",
    [
        ("12 + 7 = 19. #### 19", None, "19"),
        ("so #### 1,234.", None, "1,234."),
        ("the result is 42 and then 17", None, "17"),
        ("no number here", None, None),
        ("Answer: (B)", r"\(([A-D])\)", "B"),
    ],
)
def test_extract_answer(text, pattern, want):
    assert extract_answer(text, pattern) == want


def test_normalize_compares_numbers_by_value():
    assert normalize("1,234.") == normalize("1234") == "1234"
    assert normalize("$1,234") == normalize("$1234.00") == "1234" and normalize("$x") == "$x"  # GSM8K money
    assert normalize("3.50") == "3.5" and normalize(" Yes ") == "yes" and normalize(None) is None
    assert normalize("-0.50") == "-0.5" and normalize("+7") == "7" and normalize("1e3") == "1000"
    assert normalize("12345678901234567891") != normalize("12345678901234567890")  # one double apart
    assert normalize("-0.0") == "0" and len(normalize("1e5000")) == 5001  # past int's str limit, no ValueError
    # a generation may end in "#### inf": compared as a word, where int() used to crash the evaluation
    assert normalize("inf") == "inf" and normalize("-Infinity") == "-infinity" and normalize("NaN") == "nan"


def test_evaluation_refuses_bad_settings_before_generating():
    from reasoncache.app.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"answer_pattern '\(\[A-D\]' is not a valid regular expression"):
        evaluate(None, tiny_tokenizer(), [], answer_pattern="([A-D]")
    with pytest.raises(ValueError, match="answer_pattern"):  # training checks it before its first step
        TrainConfig(answer_pattern="([A-D]").check()
    # a negative batch size used to skip generation silently and score every example wrong
    for bad in ({"batch_size": 0}, {"batch_size": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int"):
            evaluate(None, tiny_tokenizer(), [], **bad)


def test_evaluation_refuses_examples_it_could_only_score_wrong():
    """No examples, or examples whose answer cannot be found (no 'answer', no '####', no number),
    used to give accuracy 0.0 (every such example counted wrong whatever the model wrote)."""
    with pytest.raises(ValueError, match="at least one example"):
        evaluate(None, tiny_tokenizer(), [])
    rows = [Example("q1", "#### 4"), Example("q2", "it is Monday", source="d.jsonl:2")]
    with pytest.raises(ValueError, match=r"1 of 2 examples have no answer .*the first: d.jsonl:2"):
        evaluate(None, tiny_tokenizer(), rows)
    with pytest.raises(ValueError, match="no number matching answer_pattern"):
        evaluate(None, tiny_tokenizer(), rows[:1], answer_pattern="ANSWER: (\\w+)")


def test_next_in_sequence_continues_the_sequence_by_its_step_in_either_direction():
    down = 0
    for e in make_split("next_in_sequence", 200, 0, seed=3)[0]:
        terms = [int(x) for x in re.search(r"next: ([\d, ]+)\?", e.prompt).group(1).split(", ")]
        steps = {b - a for a, b in zip(terms, terms[1:])}
        assert len(terms) == 4 and len(steps) == 1 and abs(next(iter(steps))) >= 2
        assert e.answer == str(terms[-1] + steps.pop()) and int(e.answer) > 0
        down += terms[1] < terms[0]
    assert 0 < down < 200  # both directions (and both worked-answer shapes) occur


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_split_is_disjoint_reproducible_and_self_consistent(task):
    train, test = make_split(task, 150, 100, seed=3)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert make_split(task, 150, 100, seed=3) == (train, test)
    assert make_split(task, 150, 100, seed=4) != (train, test)
    for e in train + test:
        assert "####" in e.completion and normalize(extract_answer(e.completion)) == normalize(e.answer)
    assert len(TASKS) >= 6


def test_rank_in_list_answers_the_asked_rank_of_the_prompts_numbers():
    ranks = ["smallest", "second smallest", "middle", "second largest", "largest"]
    for e in make_split("rank_in_list", 50, 0, seed=1)[0]:
        head, nums = e.prompt.rstrip("?").split(" of ")
        values = sorted(int(x) for x in nums.split(", "))
        k = ranks.index(head.removeprefix("Which number is the "))
        assert len(values) == 5 and e.answer == str(values[k])


def test_clock_time_ends_at_the_start_plus_the_duration_on_a_24_hour_clock():
    pattern = re.compile(r"starts at (\d+):(\d\d) and lasts (\d+) hours? and (\d+) minutes")
    carried = 0
    for e in make_split("clock_time", 100, 0, seed=2)[0]:
        h, m, dh, dm = map(int, pattern.search(e.prompt).groups())
        end = (h * 60 + m) + (dh * 60 + dm)
        assert e.answer == f"{end // 60}:{end % 60:02d}" and end < 24 * 60
        carried += m + dm >= 60
    assert 0 < carried < 100  # both shapes of worked answer occur


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_family_has_enough_distinct_examples_for_a_200_step_study_run(task):
    """bench quality trains on steps x 8 examples and tests on 200, all distinct: 200 steps
    need 1,800 (day_of_week once had 406 and could not run at 100 steps)."""
    train, test = make_split(task, 1600, 200, seed=0)
    assert len({e.prompt for e in train + test}) == 1800


def test_gsm8k_rows_are_detected_and_mapped(tmp_path, capsys):
    rows = [
        {"question": "Ana had 48 clips and sold half. How many are left?",
         "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n48 - 24 = <<48-24=24>>24 are left.\n#### 24"},
        {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    ]  # fmt: skip
    f = tmp_path / "gsm.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_jsonl(f)
    assert "GSM8K-style rows; read 'question' as the prompt and 'answer' as the completion" in capsys.readouterr().err
    assert got[0].prompt == rows[0]["question"] and got[0].answer == "24" and got[1].answer == "5"
    assert "<<" not in got[0].completion and got[0].completion.startswith("She sold 48/2 = 24 clips.")
    assert extract_answer(got[0].completion) == "24"


def test_explicit_fields_and_their_errors(tmp_path):
    f = tmp_path / "own.jsonl"
    f.write_text(json.dumps({"q": "1 + 1?", "a": "1 + 1 = 2 #### 2"}) + "\n" + json.dumps({"q": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{f}:2: missing or non-string 'a' \(named by --completion-field\)"):
        load_jsonl(f, "q", "a")
    with pytest.raises(ValueError, match="--prompt-field and --completion-field go together"):
        load_jsonl(f, prompt_field="q")
    f.write_text(json.dumps({"q": "1 + 1?", "a": "1 + 1 = 2 #### 2"}) + "\n")
    (e,) = load_jsonl(f, "q", "a")
    assert (e.prompt, e.answer) == ("1 + 1?", "2")
    with pytest.raises(ValueError, match="unknown task"):
        make_split("sorting", 1, 1)
