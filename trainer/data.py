"""Prompts and gold answers for GRPO: GSM8K (hub or local JSONL, one code path) and a synthetic arithmetic task.

What: ``load_prompts(cfg, tokenizer, split)`` turns a dataset split into rows
``{"prompt": [chat messages], "prompt_text": str, "prompt_ids": [int], "question": str, "gold": str}``;
``PromptDataset`` serves them in a seeded, resumable order (its position goes into checkpoints).

Why one code path: the hub copy (``datasets.load_dataset("openai/gsm8k", "main")``) and a local copy
(``datasets.load_dataset("json", data_files=...)``) both come back as a ``datasets.Dataset`` with the same
``question`` / ``answer`` columns, and everything after loading is shared. Tests use the local files; nothing
is downloaded unless ``source="hub"``.

Prompt formats (the system prompt of the chat template):
- ``reasoning``: the reference GRPO GSM8K demo, ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``.
- ``think``: DeepSeek-R1-Zero's ``<think>...</think>`` then ``<answer>...</answer>``.

Over-long prompts are DROPPED (not truncated): cutting a chat prompt from the left would remove the system
prompt and the chat header, cutting from the right would remove the assistant header, and either way the
model would be trained on a prompt it will never see. The number dropped is logged and returned.

The synthetic arithmetic task ("What is 37 + 48?", gold "85") uses the same answer format; it is what the
CPU demo learns. ``arithmetic_solution_text`` writes a correct completion for the supervised warm start.
Train and test problems are disjoint by construction: a problem's split is a hash of its operands.

``datasets`` is imported inside functions so that ``trainer.rewards`` can import ``extract_gsm8k_gold``
cheaply.
"""

from __future__ import annotations

import logging
import random
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

PromptFormat = Literal["reasoning", "think"]

# The reference demo's system prompt, verbatim.
REASONING_SYSTEM_PROMPT = """
Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>
"""

# DeepSeek-R1-Zero's instruction (paper, Table 1), with the tag layout our strict format reward checks.
THINK_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think>\nreasoning process here\n</think>\n"
    "<answer>\nanswer here\n</answer>"
)

SYSTEM_PROMPTS: dict[str, str] = {"reasoning": REASONING_SYSTEM_PROMPT, "think": THINK_SYSTEM_PROMPT}
REASONING_TAGS: dict[str, str] = {"reasoning": "reasoning", "think": "think"}


def extract_gsm8k_gold(answer: str | None) -> str | None:
    """The gold answer of a GSM8K solution: the text after the last ``####``, commas removed, stripped.

    ``"... #### 1,200"`` -> ``"1200"``. Returns None when there is no ``####`` or nothing after it.
    """
    if not isinstance(answer, str) or "####" not in answer:
        return None
    after = answer[answer.rfind("####") + 4 :].strip()
    gold = after.splitlines()[0].replace(",", "").strip() if after else ""
    return gold or None


class ArithmeticConfig(BaseModel):
    """Knobs of the synthetic arithmetic task ("What is 37 + 48?")."""

    model_config = ConfigDict(extra="forbid")

    n_train: int = Field(2000, ge=1, le=1_000_000, description="number of training problems")
    n_test: int = Field(200, ge=1, le=1_000_000, description="number of test problems")
    min_digits: int = Field(1, ge=1, le=9, description="fewest digits of an operand")
    max_digits: int = Field(2, ge=1, le=9, description="most digits of an operand")
    ops: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+", "-"],
        min_length=1,
        description="operators to draw from; '-' keeps the result non-negative (a >= b)",
    )

    @model_validator(mode="after")
    def _digits_ordered(self) -> ArithmeticConfig:
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits must be <= max_digits")
        return self


class DataConfig(BaseModel):
    """Where prompts come from and how they are rendered."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["hub", "jsonl", "arithmetic"] = Field(
        "hub",
        description="'hub': datasets.load_dataset(hub_id, hub_config); 'jsonl': local train_path/test_path "
        "through datasets' json loader; 'arithmetic': the synthetic task (see `arithmetic`)",
    )
    hub_id: str = Field("openai/gsm8k", min_length=1, description="dataset id on the Hugging Face hub")
    hub_config: str | None = Field("main", description="dataset config name on the hub")
    train_path: str | None = Field(None, description="JSONL with question/answer fields (source='jsonl')")
    test_path: str | None = Field(None, description="JSONL with question/answer fields (source='jsonl')")
    question_field: str = Field("question", min_length=1, description="column holding the question")
    answer_field: str = Field("answer", min_length=1, description="column holding the '#### gold' solution")
    cache_dir: str | None = Field(None, description="datasets cache folder (None: the datasets default)")
    prompt_format: PromptFormat = Field(
        "reasoning", description="'reasoning' (<reasoning>/<answer>) or 'think' (R1-Zero <think>/<answer>)"
    )
    system_prompt: str | None = Field(
        None, max_length=20_000, description="override the format's system prompt (None: the default)"
    )
    max_prompt_length: int = Field(
        512, ge=8, le=131_072, description="prompts longer than this many tokens are dropped (and counted)"
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="seed of the prompt order (and of the arithmetic task)"
    )
    shuffle: bool = Field(True, description="shuffle prompts each epoch (order fixed by seed and epoch)")
    limit_train: int | None = Field(None, ge=1, description="keep only the first N training rows")
    limit_test: int | None = Field(None, ge=1, description="keep only the first N test rows")
    arithmetic: ArithmeticConfig = Field(
        default_factory=ArithmeticConfig, description="the synthetic task (source='arithmetic')"
    )

    @model_validator(mode="after")
    def _paths_for_jsonl(self) -> DataConfig:
        if self.source == "jsonl" and not self.train_path:
            raise ValueError("source='jsonl' needs train_path")
        return self


# ---------------------------------------------------------------- synthetic arithmetic


def _split_of(a: int, op: str, b: int) -> str:
    """Every tenth problem (by a stable hash of its operands) belongs to the test split."""
    return "test" if zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0 else "train"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_arithmetic_problems(
    n: int,
    seed: int = 0,
    min_digits: int = 1,
    max_digits: int = 2,
    ops: tuple[str, ...] | list[str] = ("+", "-"),
    split: Literal["train", "test"] = "train",
) -> list[dict[str, Any]]:
    """``n`` problems ``{"question", "answer" ('... #### gold', GSM8K style), "gold", "a", "op", "b"}``.

    Deterministic for a given seed; a problem is in exactly one split (hash of its operands), so train and
    test never share a problem whatever the seeds. Problems may repeat within a split when the space is small.
    """
    if not ops or any(op not in ("+", "-", "*") for op in ops):
        raise ValueError(f"ops must be a non-empty subset of + - *, got {ops!r}")
    rng = random.Random(f"arithmetic:{seed}:{split}")
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * n + 10_000:
            raise ValueError(f"could not draw {n} {split} problems from this small a space")
        op = rng.choice(list(ops))
        a = _operand(rng, rng.randint(min_digits, max_digits))
        b = _operand(rng, rng.randint(min_digits, max_digits))
        if op == "-" and b > a:
            a, b = b, a
        if _split_of(a, op, b) != split:
            continue
        c = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(
            {
                "question": f"What is {a} {op} {b}?",
                "answer": f"{a} {op} {b} = {c}\n#### {c}",
                "gold": str(c),
                "a": a,
                "op": op,
                "b": b,
            }
        )
    return out


def column_addition_steps(a: int, b: int) -> list[str]:
    """Schoolbook addition, units column first: ``37 + 48`` -> ``["7 + 8 = 15", "3 + 4 + 1 = 8"]``.

    Why: a tiny model cannot learn a two-digit sum as one lookup (it memorises the training problems and stays
    near chance on held-out ones); one line per column makes every step a one-digit fact plus a carry, which
    it learns and generalises (tuning report: 31% held-out after the warm start vs ~8% with one line).
    """
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        dx = int(xs[i]) if i < len(xs) else 0
        dy = int(ys[i]) if i < len(ys) else 0
        s = dx + dy + carry
        steps.append(f"{dx} + {dy}" + (f" + {carry}" if carry else "") + f" = {s}")
        carry = s // 10
    return steps


def arithmetic_solution_text(problem: dict[str, Any], prompt_format: PromptFormat = "reasoning") -> str:
    """A correct completion in the answer format (earns every reference reward: 4.0 in total).

    Additions are worked column by column (``column_addition_steps``) before the final line; other
    operations get the final line only.
    """
    a, op, b, gold = problem["a"], problem["op"], problem["b"], problem["gold"]
    tag = REASONING_TAGS[prompt_format]
    steps = column_addition_steps(a, b) if op == "+" else []
    body = "\n".join([*steps, f"{a} {op} {b} = {gold}"])
    return f"<{tag}>\n{body}\n</{tag}>\n<answer>\n{gold}\n</answer>\n"


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def gsm8k_solution_text(answer: str, gold: str, prompt_format: PromptFormat = "reasoning") -> str:
    """A GSM8K worked solution ("steps... #### 72") rewritten into the answer format: the steps (calculator
    annotations removed) as the reasoning, the gold number as the answer. Earns every reference reward."""
    steps = answer.split("####")[0]
    steps = "\n".join(
        line.strip() for line in _CALCULATOR.sub("", steps).strip().splitlines() if line.strip()
    )
    tag = REASONING_TAGS[prompt_format]
    return f"<{tag}>\n{steps}\n</{tag}>\n<answer>\n{gold}\n</answer>\n"


# ---------------------------------------------------------------- loading and prompt building


def build_messages(
    question: str, prompt_format: PromptFormat = "reasoning", system_prompt: str | None = None
):
    """The chat messages of one prompt: the format's system prompt (or the override), then the question."""
    system = SYSTEM_PROMPTS[prompt_format] if system_prompt is None else system_prompt
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def load_raw_split(cfg: DataConfig, split: Literal["train", "test"]):
    """The split as a ``datasets.Dataset`` with question/answer columns (hub and JSONL: the same loader)."""
    import datasets

    limit = cfg.limit_train if split == "train" else cfg.limit_test
    if cfg.source == "arithmetic":
        ac = cfg.arithmetic
        n = ac.n_train if split == "train" else ac.n_test
        rows = make_arithmetic_problems(
            n if limit is None else min(n, limit), cfg.seed, ac.min_digits, ac.max_digits, ac.ops, split
        )
        return datasets.Dataset.from_list(rows)
    if cfg.source == "hub":
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=split, cache_dir=cfg.cache_dir)
    else:
        path = cfg.train_path if split == "train" else cfg.test_path
        if not path:
            raise ValueError(f"source='jsonl' needs {split}_path")
        ds = datasets.load_dataset("json", data_files={split: path}, split=split, cache_dir=cfg.cache_dir)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


@dataclass
class PromptSplit:
    """Prompt rows of one split and what was dropped on the way."""

    rows: list[dict[str, Any]]
    n_raw: int
    n_dropped_too_long: int = 0
    n_dropped_no_gold: int = 0

    def __len__(self) -> int:
        return len(self.rows)


def build_prompt_rows(
    examples, tokenizer, cfg: DataConfig, question_field: str = "question", answer_field: str = "answer"
) -> PromptSplit:
    """Render question/answer examples into prompt rows; drop rows without a gold or over max_prompt_length."""
    kept: list[dict[str, Any]] = []
    n_raw = no_gold = 0
    pending: list[dict[str, Any]] = []
    for ex in examples:
        n_raw += 1
        gold = ex.get("gold") or extract_gsm8k_gold(ex.get(answer_field))
        question = ex.get(question_field)
        if gold is None or not isinstance(question, str):
            no_gold += 1
            continue
        messages = build_messages(question, cfg.prompt_format, cfg.system_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        row = {"prompt": messages, "prompt_text": text, "question": question, "gold": str(gold)}
        if isinstance(ex.get(answer_field), str):
            row["solution"] = ex[answer_field]  # the worked solution, for the gsm8k_solutions warm start
        pending.append(row)
    # One batched call: the chat template already contains the special tokens, so add none.
    ids = (
        tokenizer([r["prompt_text"] for r in pending], add_special_tokens=False)["input_ids"]
        if pending
        else []
    )
    too_long = 0
    for row, row_ids in zip(pending, ids, strict=True):
        if len(row_ids) > cfg.max_prompt_length:
            too_long += 1
            continue
        row["prompt_ids"] = list(row_ids)
        kept.append(row)
    return PromptSplit(kept, n_raw, too_long, no_gold)


def load_prompts(cfg: DataConfig, tokenizer, split: Literal["train", "test"] = "train") -> PromptSplit:
    """Load a split and build its prompt rows; logs how many were dropped and why."""
    ds = load_raw_split(cfg, split)
    out = build_prompt_rows(ds, tokenizer, cfg, cfg.question_field, cfg.answer_field)
    if out.n_dropped_too_long or out.n_dropped_no_gold:
        log.warning(
            "%s split: kept %d of %d prompts (%d longer than %d tokens dropped, %d without a gold answer dropped)",
            split,
            len(out),
            out.n_raw,
            out.n_dropped_too_long,
            cfg.max_prompt_length,
            out.n_dropped_no_gold,
        )
    else:
        log.info("%s split: %d prompts", split, len(out))
    if not out.rows:
        raise ValueError(f"{split} split has no usable prompts (raw rows: {out.n_raw})")
    return out


def prompt_text(
    tokenizer, question: str, prompt_format: PromptFormat = "reasoning", system_prompt: str | None = None
):
    """One question rendered with the chat template and the assistant header (what the model continues)."""
    messages = build_messages(question, prompt_format, system_prompt)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_rows(
    tokenizer, cfg: DataConfig, limit: int | None = None, split: Literal["train", "test"] = "train"
) -> list[dict[str, Any]]:
    """Text prompts for sampling (the warm start's rejection sampling): ``{"prompt": prompt_text, "gold",
    "question"}`` for the first ``limit`` usable rows of ``split``. Note ``prompt`` is the rendered TEXT here,
    unlike ``load_prompts`` rows, whose ``prompt`` is the message list."""
    rows = load_prompts(cfg, tokenizer, split).rows
    rows = rows if limit is None else rows[:limit]
    return [{"prompt": r["prompt_text"], "gold": r["gold"], "question": r["question"]} for r in rows]


def arithmetic_sft_pairs(tokenizer, cfg: DataConfig, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt_text, correct completion) pairs of the arithmetic task's TRAIN split, in
    ``cfg.prompt_format`` with ``cfg.arithmetic``'s difficulty, for the supervised warm start."""
    ac = cfg.arithmetic
    probs = make_arithmetic_problems(n, seed, ac.min_digits, ac.max_digits, ac.ops, "train")
    return [
        (
            prompt_text(tokenizer, p["question"], cfg.prompt_format, cfg.system_prompt),
            arithmetic_solution_text(p, cfg.prompt_format),
        )
        for p in probs
    ]


# ---------------------------------------------------------------- resumable order


@dataclass
class DataState:
    """Position in the prompt stream: the order of an epoch is a function of (seed, epoch)."""

    epoch: int = 0
    index: int = 0
    seed: int = 0


@dataclass
class PromptDataset:
    """Serves rows in a seeded order that changes every epoch; ``state_dict`` resumes it exactly.

    >>> ds = PromptDataset(rows, seed=0)
    >>> batch = ds.next_batch(8)       # crosses epoch boundaries by itself
    >>> saved = ds.state_dict()        # {"epoch": .., "index": .., "seed": ..}
    """

    rows: list[dict[str, Any]]
    seed: int = 0
    shuffle: bool = True
    state: DataState = field(init=False)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("PromptDataset needs at least one row")
        self.state = DataState(seed=self.seed)
        self._order_epoch = -1
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> list[int]:
        """Row indices of ``epoch``, in serving order."""
        if epoch != self._order_epoch:
            idx = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.state.seed * 1_000_003 + epoch).shuffle(idx)
            self._order, self._order_epoch = idx, epoch
        return self._order

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` rows (n >= 1), continuing into the next epoch when this one ends."""
        if n < 1:
            raise ValueError("n must be >= 1")
        out = []
        while len(out) < n:
            order = self.order(self.state.epoch)
            out.append(self.rows[order[self.state.index]])
            self.state.index += 1
            if self.state.index >= len(order):
                self.state.epoch, self.state.index = self.state.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "index": self.state.index, "seed": self.state.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        if epoch < 0 or not 0 <= index < len(self.rows):
            raise ValueError(f"bad data position {state} for {len(self.rows)} rows")
        self.state = DataState(epoch=epoch, index=index, seed=seed)
        self._order_epoch = -1
