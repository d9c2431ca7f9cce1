"""Pure scoring of GSM8K completions for evaluation: strict / lenient correctness, format, statistics.

Why a module of its own: scoring decides the headline number, so it is a set of pure functions with no
model, server or file in sight, tested on a fixed table of completions (tests/test_eval_scoring.py).

Two correctness rules, reported side by side because published GSM8K numbers mix them (FIELD.md):
- STRICT: the completion has a closed ``<answer>...</answer>`` block and the number inside the last
  such block equals the gold answer. Text outside the tags does not count.
- LENIENT: the last number anywhere in the completion equals the gold answer (tags or not).
They differ both ways: "The answer is 18." is lenient-correct only; "<answer>18</answer> (checked 2
ways)" is strict-correct only.

Numbers compare by value after removing thousands separators, currency signs and a trailing period:
"1,000", "$1000.00" and "1000" are equal. Format compliance is the R1-Zero layout: one reasoning block
(``<reasoning>`` or ``<think>``) followed by one answer block and nothing else.

Statistics: the unbiased pass@k estimator of Chen et al. (2021), the Wilson score interval for a
binomial proportion, and a seeded percentile bootstrap for means of per-problem values (pass@k).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# A number as written in GSM8K answers and model outputs: sign, thousands separators, decimals.
# A minus is a sign only when it touches the number and not the word before it: "16-3" and "10 - 3" are
# subtractions (16 and 3; 10 and 3), "is -3", "-$18" and "-$ 18" are negative.
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-(?=\d|\$\s?\d))?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# A block's content may not contain "<answer>": the innermost (last opened) block counts, and thousands of
# unclosed tags are one linear scan (a plain .*? rescanned the rest of the text from each: about 1 s for 4,096).
_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# The whole completion: a reasoning block, then an answer block, nothing before or after but spaces. Neither
# block may contain a tag of the layout, so two blocks in a row (or nested ones) are not "exactly one".
_FORMAT_RE = re.compile(
    r"^\s*<(reasoning|think)>(?:(?!</?(?:reasoning|think|answer)>).)*?</\1>\s*"
    r"<answer>(?:(?!</?(?:reasoning|think|answer)>).)*?</answer>\s*$",
    re.DOTALL,
)


def parse_number(text: str) -> Decimal | None:
    """The value of one number written like ``-1,234.50`` / ``$18`` / ``18.``; None if it is not one."""
    s = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: str) -> Decimal | None:
    """The last number appearing in ``text`` (the LENIENT answer), or None when there is none."""
    matches = _NUMBER_RE.findall(text)
    for m in reversed(matches):
        value = parse_number(m)
        if value is not None:
            return value
    return None


def answer_block(text: str) -> str | None:
    """The content of the last closed ``<answer>...</answer>`` block, or None when there is none."""
    blocks = _ANSWER_RE.findall(text)
    return blocks[-1] if blocks else None


def strict_answer(text: str) -> Decimal | None:
    """The STRICT answer: the last number inside the last closed answer block."""
    block = answer_block(text)
    return None if block is None else last_number(block)


def is_well_formatted(text: str) -> bool:
    """True when the completion is exactly one reasoning block followed by one answer block."""
    return _FORMAT_RE.match(text) is not None


def numbers_equal(a: Decimal | None, gold: str | Decimal | None) -> bool:
    """Value equality of a parsed answer and the gold answer (either may be missing -> False)."""
    if a is None or gold is None:
        return False
    g = gold if isinstance(gold, Decimal) else parse_number(str(gold))
    return g is not None and a == g


@dataclass(frozen=True)
class CompletionScore:
    """Scores of one completion against one gold answer."""

    strict: bool  # the number in the <answer> block equals gold
    lenient: bool  # the last number in the text equals gold
    formatted: bool  # reasoning block then answer block, nothing else
    strict_answer: str | None  # what STRICT read (normalized), for the per-problem JSONL
    lenient_answer: str | None  # what LENIENT read (normalized)


def _fmt(value: Decimal | None) -> str | None:
    if value is None:
        return None
    # normalize() turns 18.00 into 18 and 1E+3 back into 1000 for readable output.
    v = value.normalize()
    return format(v, "f")


def score_completion(text: str, gold: str) -> CompletionScore:
    """Score one completion (the model's text, with any prompt prefill prepended by the caller)."""
    s, lv = strict_answer(text), last_number(text)
    return CompletionScore(
        strict=numbers_equal(s, gold),
        lenient=numbers_equal(lv, gold),
        formatted=is_well_formatted(text),
        strict_answer=_fmt(s),
        lenient_answer=_fmt(lv),
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    # Product form of the binomial ratio: numerically stable, no huge factorials.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when total is 0."""
    if total <= 0:
        return (0.0, 1.0)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: Sequence[float], n_resamples: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (seeded: same input, same interval)."""
    if not values:
        return (0.0, 1.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    lo = means[int(math.floor(alpha / 2 * (n_resamples - 1)))]
    hi = means[int(math.ceil((1 - alpha / 2) * (n_resamples - 1)))]
    return (lo, hi)
