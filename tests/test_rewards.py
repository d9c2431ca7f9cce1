"""Rewards: exact reference values on tricky completions, the registry, TRL's signature, math equivalence,
bounded work on huge outputs, and the safe wrapper that turns errors into counted zeros."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from trainer.rewards import (
    REFERENCE_REWARDS,
    REWARD_REGISTRY,
    AnswerFormat,
    RewardConfig,
    RewardSet,
    SafeReward,
    extract_answer,
    get_reward,
)

NAMES = ["correctness", "integer", "strict_format", "soft_format", "xml_count"]


def R(body: str, answer: str, tail: str = "\n", tag: str = "reasoning") -> str:
    return f"<{tag}>\n{body}\n</{tag}>\n<answer>\n{answer}\n</answer>{tail}"


UNCLOSED = "<reasoning>\nx\n</reasoning>\n<answer>\n72"
NO_FINAL_NEWLINE = R("x", "72", tail="")
NESTED = "<reasoning>\n<reasoning>\nx\n</reasoning>\n</reasoning>\n<answer>\n5\n</answer>\n"

# (id, completion, gold, {reward: expected value}); total = sum (weights 1.0). Values derived by hand from the
# reference semantics documented in trainer/rewards.py.
CASES = [
    ("perfect", R("48/2 = 24", "72"), "72", dict(correctness=2.0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    ("correct_but_untagged", "72", "72", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0)),
    ("tagged_but_wrong", R("x", "71"), "72", dict(correctness=0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    # An empty answer earns no format reward (the reference gave it strict and soft format: 1.5 in all, as much
    # as a wrong answer); the tag count still counts the tags.
    ("empty_answer_empty_gold", R("x", ""), "", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0.5)),
    ("empty_answer_tags_inline", "<reasoning>x</reasoning><answer></answer>", "", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0)),
    ("blank_answer", R("x", "   "), "72", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0.5)),
    ("commas_and_dollars", R("x", "$1,200"), "1200", dict(correctness=0, integer=0, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    # 'Thanks!' is 7 characters: both reference penalties are 0.007.
    ("trailing_text", R("r", "72", tail="\nThanks!"), "72", dict(correctness=2.0, integer=0.5, strict_format=0, soft_format=0.5, xml_count=0.5 - 0.007 - 0.007)),
    # <reasoning>\n occurs twice (no credit); \n</reasoning>\n counts once (str.count does not overlap). Nested
    # blocks are not the strict layout; the soft one (from the start, lazily) still matches.
    ("nested_tags", NESTED, "5", dict(correctness=2.0, integer=0.5, strict_format=0, soft_format=0.5, xml_count=0.375)),
    # Two whole blocks: with DOTALL a plain .*? in the strict pattern ran across both. Every tag occurs twice.
    ("two_blocks", R("a", "5") + R("b", "18"), "18", dict(correctness=2.0, integer=0.5, strict_format=0, soft_format=0.5, xml_count=0)),
    # The reference (no DOTALL) gave 0 for both format rewards here.
    ("multi_line_reasoning", R("line 1\nline 2\nline 3", "9"), "9", dict(correctness=2.0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    # No \n</answer>\n: the first penalty measures the whole text (38 chars); the answer tag is unclosed.
    ("unclosed_answer", UNCLOSED, "72", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0.375 - 0.038)),
    # 48 chars, nothing after \n</answer>: -0.048 and +0.001 (reference quirks).
    ("no_final_newline", NO_FINAL_NEWLINE, "72", dict(correctness=2.0, integer=0.5, strict_format=0, soft_format=0.5, xml_count=0.5 - 0.048 + 0.001)),
    ("answer_with_spaces", R("x", "  72  "), "72", dict(correctness=2.0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    # A negative integer is an integer (the reference's str.isdigit said no).
    ("negative_number", R("x", "-3"), "-3", dict(correctness=2.0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    ("minus_alone", R("x", "-"), "-3", dict(correctness=0, integer=0, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    ("none", None, "72", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0)),
    ("empty_string", "", "72", dict(correctness=0, integer=0, strict_format=0, soft_format=0, xml_count=0)),
    ("gold_missing", R("x", "72"), None, dict(correctness=0, integer=0.5, strict_format=0.5, soft_format=0.5, xml_count=0.5)),
    # \n<answer>\n occurs once (the first <answer> opens the text): +0.125 minus the 21 characters after the
    # first \n</answer>\n; \n</answer> occurs twice (no credit).
    ("two_answers_last_wins", "<answer>\n1\n</answer>\n<answer>\n72\n</answer>", "72", dict(correctness=2.0, integer=0.5, strict_format=0, soft_format=0, xml_count=0.125 - 0.021)),
]  # fmt: skip


def test_case_lengths_used_in_the_table():
    assert len(UNCLOSED) == 38 and len(NO_FINAL_NEWLINE) == 48


@pytest.mark.parametrize("case_id,completion,gold,expected", CASES, ids=[c[0] for c in CASES])
def test_reference_rewards_table(case_id, completion, gold, expected):
    rs = RewardSet(dict.fromkeys(NAMES, 1.0))
    scores = rs(["prompt"], [completion], gold=[gold])
    for name in NAMES:
        assert scores.per_func[name][0] == pytest.approx(expected[name], abs=1e-9), name
    assert scores.total[0] == pytest.approx(sum(expected.values()), abs=1e-9)
    assert rs.failures == dict.fromkeys(NAMES, 0)


def test_chat_message_completions_and_trl_signature():
    text = R("x", "72")
    fn = get_reward("correctness")
    assert fn.__name__ == "correctness"
    # TRL passes prompts, completions and every dataset column (plus extras such as completion_ids).
    out = fn(
        prompts=[[{"role": "user", "content": "q"}]] * 3,
        completions=[
            [{"role": "assistant", "content": text}],
            [{"role": "assistant", "content": [{"type": "text", "text": text}]}],
            [{"role": "assistant", "content": R("x", "1")}],
        ],
        gold=["72", "72", "72"],
        completion_ids=[[1], [2], [3]],
        question=["a", "b", "c"],
    )
    assert out == [2.0, 2.0, 0.0]


def test_gold_from_gsm8k_answer_column():
    fn = get_reward("correctness")
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,200"
    assert fn(None, [R("x", "1200"), R("x", "1,200")], answer=[solution, solution]) == [2.0, 0.0]
    assert fn(None, [R("x", "7")], answer=["7"]) == [2.0]  # a bare answer column is the gold itself
    assert fn(None, [R("x", "7")]) == [0.0]  # no gold column at all


def test_think_format_uses_think_tags():
    perfect_think = R("x", "72", tag="think")
    think = RewardSet(dict.fromkeys(NAMES, 1.0), prompt_format="think")
    assert think(None, [perfect_think], gold=["72"]).total == [pytest.approx(4.0)]
    reasoning = RewardSet(dict.fromkeys(NAMES, 1.0), prompt_format="reasoning")
    # Only the answer tags are right for the reasoning format: correctness + integer + 2 xml tags.
    assert reasoning(None, [perfect_think], gold=["72"]).total == [pytest.approx(2.0 + 0.5 + 0.25)]
    custom = get_reward("strict_format", AnswerFormat(reasoning_tag="scratch"))
    assert custom(None, [R("x", "1", tag="scratch")]) == [0.5]
    with pytest.raises(ValueError):
        AnswerFormat(reasoning_tag="bad tag>")


def test_huge_outputs_are_bounded():
    tail = R("x", "72")
    huge = "x" * 5_000_000 + tail
    rs = RewardSet(dict.fromkeys([*NAMES, "correctness_math"], 1.0))
    t0 = time.perf_counter()
    scores = rs(None, [huge, "<reasoning>" * 500_000, "<answer>\n" * 600_000 + "</answer>"], gold=["72"] * 3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, elapsed
    # Only the last 32 KB is read: strict/soft (anchored at the start) fail, the rest see the tail.
    assert scores.per_func["correctness"][0] == 2.0 and scores.per_func["xml_count"][0] == pytest.approx(0.5)
    assert scores.per_func["strict_format"][0] == 0.0 and scores.per_func["soft_format"][0] == 0.0
    assert scores.total[1] == 0.0
    assert scores.per_func["correctness"][2] == 0.0
    assert sum(rs.failures.values()) == 0


MATH_EQUAL = ["1200", "1,200", "$1200", "$1,200", "1200.00", "\\boxed{1200}", "1200 dollars"]
MATH_DIFFERENT = ["1199", "12000", "1,200,000", "-1200", "", "9^9^9^9", "2**2**2**2**2**2", "1" * 300]


def test_correctness_math_equivalence():
    fn = get_reward("correctness_math")
    assert fn(None, [R("x", a) for a in MATH_EQUAL], gold=["1200"] * len(MATH_EQUAL)) == [2.0] * len(
        MATH_EQUAL
    )
    t0 = time.perf_counter()
    got = fn(None, [R("x", a) for a in MATH_DIFFERENT], gold=["1200"] * len(MATH_DIFFERENT))
    assert got == [0.0] * len(MATH_DIFFERENT)
    assert time.perf_counter() - t0 < 20.0  # exponent towers are refused, not evaluated
    assert fn(None, [R("x", "0.5")], gold=["1/2"]) == [2.0]
    assert fn(None, [R("x", "")], gold=[""]) == [0.0]
    # The plain correctness reward is exact string equality, as in the reference.
    assert get_reward("correctness")(None, [R("x", "1,200")], gold=["1200"]) == [0.0]


def test_correctness_math_works_off_the_main_thread():
    fn = get_reward("correctness_math")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(fn, None, [R("x", a)], gold=["1200"]) for a in MATH_EQUAL + ["7"]]
        results = [f.result(timeout=60) for f in futures]
    assert results == [[2.0]] * len(MATH_EQUAL) + [[0.0]]


def test_registry_and_get_reward():
    assert set(REFERENCE_REWARDS) | {"correctness_math"} <= set(REWARD_REGISTRY)
    for name, spec in REWARD_REGISTRY.items():
        fn = get_reward(name)
        assert fn.__name__ == name
        best = fn(None, [R("work", "72")], gold=["72"])[0]
        assert best == pytest.approx(spec.max_value), name
    with pytest.raises(KeyError):
        get_reward("no_such_reward")


def test_weights_from_config():
    cfg = RewardConfig(weights={"correctness": 0.5, "xml_count": 2.0})
    rs = RewardSet.from_config(cfg)
    s = rs(None, [R("x", "72"), R("x", "1")], gold=["72", "72"])
    assert s.per_func == {"correctness": [2.0, 0.0], "xml_count": [0.5, 0.5]}
    assert s.total == [pytest.approx(0.5 * 2.0 + 2.0 * 0.5), pytest.approx(2.0 * 0.5)]
    default = RewardConfig()
    assert set(default.weights) == set(REFERENCE_REWARDS) and all(w == 1.0 for w in default.weights.values())
    with pytest.raises(ValueError):
        RewardConfig(weights={"nope": 1.0})
    with pytest.raises(ValueError):
        RewardConfig(weights={"correctness": float("nan")})
    with pytest.raises(ValueError):
        RewardConfig(max_completion_chars=10)


def test_raising_reward_is_caught_and_counted():
    def flaky(prompts, completions, **kw):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0 for _ in completions]

    def bad_values(prompts, completions, **kw):
        return [float("nan"), "x", None][: len(completions)]

    rs = RewardSet({"flaky": 1.0, "bad": 1.0, "correctness": 1.0}, extra={"flaky": flaky, "bad": bad_values})
    s = rs(None, ["ok", "boom", R("x", "7")], gold=["1", "2", "7"])
    # The batch failed, so it was retried one by one: only the "boom" completion scores 0 and counts.
    assert s.per_func["flaky"] == [1.0, 0.0, 1.0]
    assert s.per_func["bad"] == [0.0, 0.0, 0.0]  # NaN and a string count; None (TRL's n/a) does not
    assert s.per_func["correctness"] == [0.0, 0.0, 2.0]
    assert s.total == [1.0, 0.0, 3.0]
    assert s.failures == {"flaky": 1, "bad": 2, "correctness": 0}
    rs(None, ["boom"], gold=["1"])
    assert rs.failures["flaky"] == 2

    # numpy's scalars and one-element tensors count, as TRL takes them; bools of any library, complex numbers
    # and a huge int do not
    others = [np.float32(0.5), np.int64(2), torch.tensor(1.5), torch.tensor([1.0, 2.0]), True, np.True_]
    others += [torch.tensor(True), np.complex64(1), 10**400]

    def other_numbers(prompts, completions, **kw):
        return others[: len(completions)]

    safe = SafeReward(other_numbers)
    assert safe(None, list("abcdefghi")) == [0.5, 2.0, 1.5] + [0.0] * 6
    assert safe.failures == 6

    def wrong_length(prompts, completions, **kw):
        return [1.0]

    safe = SafeReward(wrong_length)
    assert safe(None, ["a", "b"]) == [1.0, 1.0]  # retried one by one, where the length is right
    assert safe.failures == 0


def test_extract_answer():
    assert extract_answer("<answer> 7 </answer>") == "7"
    assert extract_answer("<answer>7") is None
    assert extract_answer("7</answer>") is None
    assert extract_answer("<answer>1</answer><answer>2</answer>") == "2"
    assert extract_answer("<answer>\n</answer>") == ""


def test_only_the_last_max_chars_are_read():
    text = R("x", "72") + "y" * 100
    assert get_reward("correctness", max_chars=1000)(None, [text], gold=["72"]) == [2.0]
    assert get_reward("correctness", max_chars=50)(None, [text], gold=["72"]) == [0.0]
    with pytest.raises(ValueError):
        get_reward("correctness", max_chars=0)
