"""Reward functions for GSM8K-style GRPO: the five reference rewards, a math-equivalence correctness, a registry,
a failure-counting safe wrapper and a weighted combination.

Every reward has TRL's signature ``fn(prompts, completions, **dataset_columns) -> list[float]``; a completion
is a string or a chat-message list (``[{"role": "assistant", "content": ...}]``); the gold answer comes in the
``gold`` column (or ``answer``: a GSM8K solution, whose ``#### gold`` is extracted). Each function returns the
reference value; weights (default 1.0) are applied by ``RewardSet``.

The reference is the well-known GRPO GSM8K demo (``grpo_demo.py``). What we reproduce and where we differ:

- ``correctness`` 2.0: the text between the last ``<answer>`` and the next ``</answer>``, stripped, equals the
  gold string. DIFFERENCE: the reference splits on the tags, so an untagged completion whose whole text is the
  gold earned 2.0, and an unclosed ``<answer>`` counted to the end of the text; we require both tags. An empty
  answer never earns correctness, even when the gold is empty.
- ``integer`` 0.5: that same extracted answer is an integer in ASCII digits, ``-`` allowed (the reference used
  ``str.isdigit``, which gave a negative integer nothing, accepted e.g. superscripts, and applied it to
  untagged text too; a few GSM8K golds are negative).
- ``strict_format`` 0.5: ``^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$`` with ``re.match``.
- ``soft_format`` 0.5: ``<reasoning>.*?</reasoning>\\s*<answer>.*?</answer>`` with ``re.match`` (anchored at
  the start, not the end).
  DIFFERENCE for both: the reference ran these without ``re.DOTALL``, so ``.`` never crossed a newline and any
  multi-line reasoning or answer earned no format reward at all; ours use ``re.DOTALL``. ``$`` keeps Python's
  meaning (end, or just before a final newline), as in the reference. So that DOTALL does not let the strict
  pattern run across blocks, its ``.*?`` may not contain a reasoning or answer tag: two blocks in a row, or
  nested ones, are not the strict layout. And both need a non-empty answer (``extract_answer``): an empty
  ``<answer></answer>`` earns no format reward, so it scores below any answer written in the format.
- ``xml_count`` up to 0.5, the reference ``count_xml`` exactly: +0.125 for each of ``<reasoning>\\n``,
  ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` that occurs exactly once; when ``\\n<answer>\\n``
  counts, minus 0.001 x len(text after the last ``\\n</answer>\\n``), and when ``\\n</answer>`` counts, minus
  0.001 x (len(text after the last ``\\n</answer>``) - 1). Quirks kept on purpose: without a ``\\n</answer>\\n``
  the first penalty measures the WHOLE text (str.split returns it), and ``...\\n</answer>`` with nothing after
  it gets +0.001 from the second term. Best value 0.5 for ``...\\n</answer>\\n``; it can go negative.

For the ``think`` prompt format (R1-Zero) the same rewards use ``<think>``/``</think>`` in place of
``<reasoning>``/``</reasoning>``; the tag names come from ``AnswerFormat``.

``correctness_math`` (2.0) compares the extracted answer with the gold by mathematical equivalence using the
``math-verify`` library: ``1,200``, ``$1200``, ``1200.00``, ``\\boxed{1200}`` all equal ``1200``. math-verify
bounds its own run time with ``signal.alarm``, which raises off the main thread; we switch that off
(``parsing_timeout=None``, ``timeout_seconds=None``) and bound the input instead: answers over 256 characters,
or with an exponent (``^`` or ``**``: ``9^9^9^9`` makes sympy run for ever) are compared as plain strings.

Bounded work: every reward looks only at the last ``max_chars`` characters of a completion (default 32,768), so
a 5 MB completion costs the same as a 32 KB one (the strict format, anchored at the start, then fails).
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer.data import extract_gsm8k_gold

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
DEFAULT_MAX_CHARS = 32_768
MATH_MAX_ANSWER_CHARS = 256


@dataclass(frozen=True)
class AnswerFormat:
    """Tag names of an answer format: ``<{reasoning_tag}>...</{reasoning_tag}><{answer_tag}>...</{answer_tag}>``."""

    reasoning_tag: str = "reasoning"
    answer_tag: str = "answer"

    def __post_init__(self) -> None:
        for tag in (self.reasoning_tag, self.answer_tag):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", tag):
                raise ValueError(f"bad tag name {tag!r}")


FORMATS: dict[str, AnswerFormat] = {"reasoning": AnswerFormat("reasoning"), "think": AnswerFormat("think")}


# ---------------------------------------------------------------- inputs


def completion_text(completion: Any) -> str:
    """A completion as text: a string as is; a chat-message list -> its messages' contents joined; else ""."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        parts: list[str] = []
        for msg in completion:
            content = msg.get("content") if isinstance(msg, dict) else msg
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):  # multi-part content: [{"type": "text", "text": ...}]
                parts += [
                    p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                ]
        return "".join(parts)
    return ""


def golds_from(columns: dict[str, Any], n: int) -> list[str | None]:
    """Gold answers from the ``gold`` column, else from ``answer`` (a GSM8K solution or a bare answer)."""
    if columns.get("gold") is not None:
        raw, from_solution = columns["gold"], False
    elif columns.get("answer") is not None:
        raw, from_solution = columns["answer"], True
    else:
        return [None] * n
    if isinstance(raw, (str, int, float)):  # one gold for the whole batch
        raw = [raw] * n
    out: list[str | None] = []
    for g in list(raw)[:n]:
        if g is None:
            out.append(None)
        elif from_solution and isinstance(g, str) and "####" in g:
            out.append(extract_gsm8k_gold(g))
        else:
            out.append(str(g).strip())
    return out + [None] * (n - len(out))


def extract_answer(text: str, fmt: AnswerFormat = FORMATS["reasoning"]) -> str | None:
    """The text between the last ``<answer>`` and the ``</answer>`` after it, stripped; None if not both."""
    open_tag, close_tag = f"<{fmt.answer_tag}>", f"</{fmt.answer_tag}>"
    start = text.rfind(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return None
    return text[start + len(open_tag) : end].strip()


# ---------------------------------------------------------------- per-completion scores


def correctness_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    ans = extract_answer(text, fmt)
    return 2.0 if ans and gold and ans == gold.strip() else 0.0


class _DropTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_quiet = False


def _quiet_math_verify() -> None:
    """math-verify warns that its timeout is off: we know, and bound the input instead."""
    global _quiet
    if not _quiet:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutWarning())
        _quiet = True


def _math_safe(s: str) -> bool:
    return len(s) <= MATH_MAX_ANSWER_CHARS and "^" not in s and "**" not in s


def correctness_math_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    ans = extract_answer(text, fmt)
    if not ans or not gold or not gold.strip():
        return 0.0
    gold = gold.strip()
    if ans == gold:
        return 2.0
    if not (_math_safe(ans) and _math_safe(gold)):
        return 0.0
    from math_verify import parse, verify

    _quiet_math_verify()
    gold_parsed = parse(gold, parsing_timeout=None)
    ans_parsed = parse(ans, parsing_timeout=None)
    if not gold_parsed or not ans_parsed:
        return 0.0
    return 2.0 if verify(gold_parsed, ans_parsed, timeout_seconds=None) else 0.0


_INTEGER = re.compile(r"-?[0-9]+")


def integer_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    ans = extract_answer(text, fmt)
    return 0.5 if ans is not None and _INTEGER.fullmatch(ans) else 0.0


def _strict_re(fmt: AnswerFormat) -> re.Pattern[str]:
    r, a = fmt.reasoning_tag, fmt.answer_tag
    # Any character, but no tag of the format: with DOTALL a plain .*? would run across blocks, so two
    # reasoning/answer blocks in a row (or nested ones) would pass as "exactly the layout".
    body = rf"(?:(?!</?(?:{r}|{a})>).)*?"
    return re.compile(rf"^<{r}>\n{body}\n</{r}>\n<{a}>\n{body}\n</{a}>\n$", re.DOTALL)


def _soft_re(fmt: AnswerFormat) -> re.Pattern[str]:
    r, a = fmt.reasoning_tag, fmt.answer_tag
    return re.compile(rf"<{r}>.*?</{r}>\s*<{a}>.*?</{a}>", re.DOTALL)


# The answer is checked first: it is linear, and without a closed answer the soft pattern's lazy scan is not
# (0.45 s on 32 KB of repeated "</reasoning><answer>" lines).
def strict_format_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    return 0.5 if extract_answer(text, fmt) and _strict_re(fmt).match(text) else 0.0


def soft_format_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    return 0.5 if extract_answer(text, fmt) and _soft_re(fmt).match(text) else 0.0


def xml_count_score(text: str, gold: str | None, fmt: AnswerFormat) -> float:
    r, a = fmt.reasoning_tag, fmt.answer_tag
    count = 0.0
    if text.count(f"<{r}>\n") == 1:
        count += 0.125
    if text.count(f"\n</{r}>\n") == 1:
        count += 0.125
    if text.count(f"\n<{a}>\n") == 1:
        count += 0.125
        count -= len(text.split(f"\n</{a}>\n")[-1]) * 0.001
    if text.count(f"\n</{a}>") == 1:
        count += 0.125
        count -= (len(text.split(f"\n</{a}>")[-1]) - 1) * 0.001
    return count


# ---------------------------------------------------------------- registry

ScoreFn = Callable[[str, "str | None", AnswerFormat], float]


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: a per-completion score ``score(text, gold, fmt)`` and its best value."""

    score: ScoreFn
    max_value: float
    description: str
    is_accuracy: bool = False  # a positive score means the answer is right: the "accuracy" metric counts it


REWARD_REGISTRY: dict[str, RewardSpec] = {
    "correctness": RewardSpec(
        correctness_score, 2.0, "answer in tags equals the gold string", is_accuracy=True
    ),
    "correctness_math": RewardSpec(
        correctness_math_score, 2.0, "answer in tags equals the gold (math-verify)", is_accuracy=True
    ),
    "integer": RewardSpec(integer_score, 0.5, "answer in tags is an integer (digits, optional minus)"),
    "strict_format": RewardSpec(
        strict_format_score, 0.5, "whole completion is exactly the tag layout, with an answer"
    ),
    "soft_format": RewardSpec(
        soft_format_score, 0.5, "starts with reasoning tags followed by a non-empty answer in tags"
    ),
    "xml_count": RewardSpec(xml_count_score, 0.5, "0.125 per tag line present once, minus trailing text"),
}
REFERENCE_REWARDS = ["xml_count", "soft_format", "strict_format", "integer", "correctness"]


def get_reward(
    name: str, prompt_format: str | AnswerFormat = "reasoning", max_chars: int = DEFAULT_MAX_CHARS
) -> RewardFn:
    """The registered reward ``name`` as a TRL reward function for the given prompt format.

    >>> fn = get_reward("correctness")
    >>> fn(prompts=None, completions=["<reasoning>\\nx\\n</reasoning>\\n<answer>\\n72\\n</answer>\\n"], gold=["72"])
    [2.0]
    """
    if name not in REWARD_REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REWARD_REGISTRY)}")
    spec = REWARD_REGISTRY[name]
    fmt = FORMATS[prompt_format] if isinstance(prompt_format, str) else prompt_format
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")

    def reward(
        prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any
    ) -> list[float]:
        texts = [completion_text(c)[-max_chars:] for c in completions]  # bound the work on huge outputs
        golds = golds_from(columns, len(texts))
        return [spec.score(t, g, fmt) for t, g in zip(texts, golds, strict=True)]

    reward.__name__ = reward.__qualname__ = name  # TRL logs rewards under __name__
    return reward


# ---------------------------------------------------------------- safety and combination


class SafeReward:
    """Wraps a TRL reward so it never raises: on an error the batch is retried one completion at a time and
    each completion that still fails (or returns a non-finite / non-number) scores 0.0 and counts as a failure.
    ``None`` (TRL's "not applicable") scores 0.0 without counting. Thread-safe counter: ``failures``."""

    def __init__(self, fn: RewardFn, name: str | None = None) -> None:
        self.fn = fn
        self.__name__ = name or getattr(fn, "__name__", "reward")
        self.failures = 0
        self._lock = threading.Lock()

    def _count(self, n: int, err: BaseException | str) -> None:
        with self._lock:
            self.failures += n
        log.warning("reward %s failed on %d completion(s): %r", self.__name__, n, err)

    def _clean(self, v: Any) -> tuple[float, bool]:
        if v is None:
            return 0.0, True
        # Any real number, numpy's and one-element tensors' too (TRL takes them): `.item()` turns those into
        # Python's own, whose type then decides. Not a bool of any library (`pred == gold` returned by mistake),
        # a complex number, a string or a list.
        if hasattr(v, "item"):
            try:
                v = v.item()
            except (ValueError, RuntimeError):  # several elements
                return 0.0, False
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return 0.0, False
        try:
            x = float(v)
        except OverflowError:  # e.g. 10**400
            return 0.0, False
        return (x, True) if math.isfinite(x) else (0.0, False)

    def __call__(
        self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns
    ) -> list[float]:
        n = len(completions)
        try:
            values = list(self.fn(prompts=prompts, completions=completions, **columns))
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
        except Exception:
            values = [self._one(prompts, completions, columns, i) for i in range(n)]
        out, bad = [], 0
        for v in values:
            x, ok = self._clean(v)
            out.append(x)
            bad += not ok
        if bad:
            self._count(bad, "non-finite or non-numeric value")
        return out

    def _one(self, prompts, completions, columns: dict[str, Any], i: int) -> Any:
        def pick(col: Any) -> Any:
            return [col[i]] if isinstance(col, (list, tuple)) and len(col) == len(completions) else col

        try:
            res = self.fn(
                prompts=pick(prompts),
                completions=[completions[i]],
                **{k: pick(v) for k, v in columns.items()},
            )
            return res[0] if len(res) == 1 else float("nan")
        except Exception as err:  # a reward must never take the training step down
            self._count(1, err)
            return 0.0


class RewardConfig(BaseModel):
    """Which rewards score a completion and how they are weighted."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(REFERENCE_REWARDS, 1.0),
        min_length=1,
        description="reward name (see REWARD_REGISTRY) -> weight in the total; default: the five reference "
        "rewards at 1.0 (best total 4.0)",
    )
    prompt_format: Literal["reasoning", "think"] = Field(
        "reasoning", description="tag names the format rewards look for: <reasoning> or <think>"
    )
    max_completion_chars: int = Field(
        DEFAULT_MAX_CHARS, ge=256, le=10_000_000, description="rewards look at only the last N characters"
    )

    @field_validator("weights")
    @classmethod
    def _known_and_finite(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            if name not in REWARD_REGISTRY:
                raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARD_REGISTRY)}")
            if not math.isfinite(w) or abs(w) > 1000:
                raise ValueError(f"weight of {name} must be finite and within [-1000, 1000], got {w}")
        return v


@dataclass
class RewardScores:
    """Scores of one batch of N completions."""

    per_func: dict[str, list[float]]  # name -> [N] unweighted values
    total: list[float]  # [N] weighted sum
    failures: dict[str, int] = field(default_factory=dict)  # name -> failures in this call


def _debug_raising_reward(prompts=None, completions=(), **columns):
    raise RuntimeError("debug.raising_reward: this reward always raises")


class RewardSet:
    """Several rewards with weights: ``scores = RewardSet.from_config(cfg)(prompts, completions, gold=golds)``.

    ``extra`` adds reward functions that are not in the registry (any TRL-signature callable), by name."""

    def __init__(
        self,
        weights: dict[str, float],
        prompt_format: str | AnswerFormat = "reasoning",
        max_chars: int = DEFAULT_MAX_CHARS,
        extra: dict[str, RewardFn] | None = None,
    ) -> None:
        extra = extra or {}
        self.weights = dict(weights)
        self.funcs: dict[str, SafeReward] = {}
        for name in self.weights:
            fn = extra[name] if name in extra else get_reward(name, prompt_format, max_chars)
            self.funcs[name] = SafeReward(fn, name)

    @classmethod
    def from_config(cls, cfg: RewardConfig, extra: dict[str, RewardFn] | None = None) -> RewardSet:
        return cls(cfg.weights, cfg.prompt_format, cfg.max_completion_chars, extra)

    @classmethod
    def from_train_config(cls, cfg: Any) -> RewardSet:
        """The run's rewards: ``cfg.rewards`` (registry names -> weights), ``cfg.custom_rewards``
        ("package.module:function" -> weight) and, for fault tests, ``cfg.debug.raising_reward``."""
        weights = dict(cfg.rewards)
        extra: dict[str, RewardFn] = {}
        for path, w in cfg.custom_rewards.items():
            module, _, func = path.partition(":")
            weights[func] = w
            extra[func] = getattr(importlib.import_module(module), func)
        if cfg.debug.raising_reward:
            weights["debug_raise"] = 1.0
            extra["debug_raise"] = _debug_raising_reward
        return cls(weights, cfg.data.prompt_format, extra=extra)

    def accuracy(self, per_func: dict[str, list[float]]) -> float | None:
        """Fraction of completions the first accuracy reward (``RewardSpec.is_accuracy``) scores above 0."""
        for name, vals in per_func.items():
            spec = REWARD_REGISTRY.get(name)
            if spec is not None and spec.is_accuracy and name in self.weights:
                return sum(v > 0 for v in vals) / max(len(vals), 1)
        return None

    @property
    def failures(self) -> dict[str, int]:
        """Failures per reward since construction (for metrics)."""
        return {name: fn.failures for name, fn in self.funcs.items()}

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any
    ) -> RewardScores:
        n = len(completions)
        before = self.failures
        per_func = {
            name: fn(prompts=prompts, completions=completions, **columns) for name, fn in self.funcs.items()
        }
        total = [sum(self.weights[name] * per_func[name][i] for name in self.funcs) for i in range(n)]
        after = self.failures
        return RewardScores(per_func, total, {k: after[k] - before[k] for k in after})
