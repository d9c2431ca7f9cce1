"""Evaluation scoring on a fixed table of completions: STRICT and LENIENT differ exactly where they should."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from trainer.eval_scoring import (
    answer_block,
    bootstrap_interval,
    is_well_formatted,
    last_number,
    parse_number,
    pass_at_k,
    score_completion,
    wilson_interval,
)

# (completion, gold, strict, lenient, formatted)
TABLE = [
    # Well formatted and right: both rules agree.
    ("<reasoning>\n16-3-4 = 9, 9*2 = 18\n</reasoning>\n<answer>\n18\n</answer>", "18", True, True, True),
    ("<think>9 eggs at $2</think>\n<answer>18</answer>\n", "18", True, True, True),
    # Right number but no tags: LENIENT only.
    ("16 - 3 - 4 = 9 eggs, so she makes $18.", "18", False, True, False),
    ("The answer is 18", "18", False, True, False),
    # Right answer in tags, a later number outside them: STRICT only.
    ("<reasoning>x</reasoning><answer>18</answer> (I checked it 2 ways)", "18", True, False, False),
    # Right number in the reasoning, wrong number in the answer: neither.
    ("<reasoning>maybe 18</reasoning>\n<answer>17</answer>", "18", False, False, True),
    # Unclosed answer tag: STRICT reads nothing; LENIENT sees the last number.
    ("<reasoning>r</reasoning>\n<answer>18", "18", False, True, False),
    # Empty answer must not be credited (FIELD.md: reward bugs that credit empty answers).
    ("<reasoning>r</reasoning><answer></answer>", "18", False, False, True),
    ("", "18", False, False, False),
    # Formatting of numbers: separators, currency, decimals, trailing period.
    ("<reasoning>r</reasoning><answer>$1,000.00</answer>", "1000", True, True, True),
    ("<reasoning>r</reasoning><answer>The total is 1,000.</answer>", "1000", True, True, True),
    ("<reasoning>r</reasoning><answer>-5</answer>", "-5", True, True, True),
    # Subtraction is not a negative number, spaced or not; a minus touching the number is a sign.
    ("<reasoning>r</reasoning><answer>10-2</answer>", "8", False, False, True),
    ("The answer is 10 - 3", "-3", False, False, False),
    ("so the change is -3", "-3", False, True, False),
    ("it costs -$ 18", "-18", False, True, False),
    # Two whole blocks are not "exactly one" (a lazy .*? across lines used to span both).
    (
        "<reasoning>a</reasoning><answer>5</answer><reasoning>b</reasoning><answer>18</answer>",
        "18",
        True,
        True,
        False,
    ),
    # The LAST answer block counts for STRICT.
    ("<answer>17</answer><answer>18</answer>", "18", True, True, False),
    # Text before the reasoning block breaks the format but not correctness.
    ("Sure! <reasoning>r</reasoning><answer>18</answer>", "18", True, True, False),
]


@pytest.mark.parametrize("text,gold,strict,lenient,formatted", TABLE)
def test_scoring_table(text, gold, strict, lenient, formatted):
    s = score_completion(text, gold)
    assert (s.strict, s.lenient, s.formatted) == (strict, lenient, formatted), text


def test_table_has_cases_where_rules_disagree_both_ways():
    both = [(r[2], r[3]) for r in TABLE]
    assert (True, False) in both and (False, True) in both


def test_numbers():
    assert parse_number("$1,234.50") == parse_number("1234.5")
    assert parse_number("abc") is None
    assert last_number("no digits here") is None
    assert last_number("16-3-4=9") == 9
    assert score_completion("<answer>18</answer>", "18").strict_answer == "18"
    assert score_completion("<answer>18.00</answer>", "18").strict_answer == "18"
    assert not is_well_formatted("<reasoning>a</reasoning><answer>1</answer><answer>2</answer>")
    # A block's content never holds "<answer>": the innermost block counts (one linear scan, however many
    # unclosed tags come before it).
    assert answer_block("<answer>a<answer>b</answer>") == "b"
    assert answer_block("<answer>" * 4096) is None


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 1, 1), (8, 3, 4), (8, 7, 8), (6, 2, 3), (5, 5, 2)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert math.isclose(pass_at_k(n, c, k), _pass_at_k_by_enumeration(n, c, k), abs_tol=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and math.isclose(0.5 - lo, hi - 0.5, abs_tol=1e-9)
    # Reference value (Wilson 1927; e.g. statsmodels proportion_confint(8, 10, method="wilson")).
    lo, hi = wilson_interval(8, 10)
    assert math.isclose(lo, 0.4902, abs_tol=1e-4) and math.isclose(hi, 0.9433, abs_tol=1e-4)
    # All correct still leaves uncertainty below 1; none correct above 0.
    assert wilson_interval(10, 10)[0] < 1.0 and wilson_interval(0, 10)[1] > 0.0


def test_bootstrap_interval_is_seeded_and_covers_mean():
    values = [0.0, 0.25, 1.0, 1.0, 0.5, 0.0, 0.75, 1.0]
    a, b = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert a == b
    mean = sum(values) / len(values)
    assert a[0] < mean < a[1]
