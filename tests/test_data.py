"""Data: gold extraction, the config's bounds, GSM8K prompts from local files through datasets (the JSONL and
the hub branch), over-long prompts dropped and counted, the arithmetic task, and the resumable prompt order."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from trainer.data import (
    REASONING_SYSTEM_PROMPT,
    THINK_SYSTEM_PROMPT,
    ArithmeticConfig,
    DataConfig,
    PromptDataset,
    arithmetic_sft_pairs,
    arithmetic_solution_text,
    build_messages,
    extract_gsm8k_gold,
    load_prompts,
    make_arithmetic_problems,
    prompt_rows,
)
from trainer.rewards import REFERENCE_REWARDS, RewardSet


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def jsonl_cfg(gsm8k_dir, **kw) -> DataConfig:
    return DataConfig(
        source="jsonl",
        train_path=str(gsm8k_dir / "train.jsonl"),
        test_path=str(gsm8k_dir / "test.jsonl"),
        **kw,
    )


@pytest.mark.parametrize(
    "answer,gold",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("... #### 1,200", "1200"),
        ("####-5", "-5"),
        ("a #### 1 then #### 2.5 ", "2.5"),
        ("no marker 72", None),
        ("#### ", None),
        ("#### 18\nextra line", "18"),
        (None, None),
    ],
)
def test_extract_gsm8k_gold(answer, gold):
    assert extract_gsm8k_gold(answer) == gold


def test_every_gsm8k_row_has_a_numeric_gold(gsm8k_dir):
    for split in ("train", "test"):
        for line in (gsm8k_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            gold = extract_gsm8k_gold(json.loads(line)["answer"])
            assert gold is not None, line
            float(gold)  # a number


def test_config_bounds():
    assert DataConfig().source == "hub" and DataConfig().hub_id == "openai/gsm8k"
    with pytest.raises(ValidationError):
        DataConfig(source="jsonl")  # needs train_path
    with pytest.raises(ValidationError):
        DataConfig(max_prompt_length=4)
    with pytest.raises(ValidationError):
        DataConfig(not_a_field=1)
    with pytest.raises(ValidationError):
        DataConfig(prompt_format="xml")
    with pytest.raises(ValidationError):
        ArithmeticConfig(min_digits=3, max_digits=2)
    with pytest.raises(ValidationError):
        ArithmeticConfig(ops=["/"])


def test_gsm8k_prompts_from_jsonl(gsm8k_dir, tok):
    cfg = jsonl_cfg(gsm8k_dir, limit_train=200, max_prompt_length=2048)
    out = load_prompts(cfg, tok, "train")
    assert len(out) == out.n_raw == 200 and out.n_dropped_too_long == 0
    first = json.loads((gsm8k_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    row = out.rows[0]
    assert row["question"] == first["question"] and row["gold"] == "72"
    assert row["prompt"] == [
        {"role": "system", "content": REASONING_SYSTEM_PROMPT},
        {"role": "user", "content": first["question"]},
    ]
    assert row["prompt_text"] == tok.apply_chat_template(
        row["prompt"], tokenize=False, add_generation_prompt=True
    )
    assert row["prompt_text"].endswith("<|im_start|>assistant\n")
    assert tok.decode(row["prompt_ids"]) == row["prompt_text"]
    assert row["prompt_ids"] == tok.encode(row["prompt_text"])


def test_hub_branch_loads_a_local_dataset_folder(gsm8k_dir, tok):
    """source='hub' goes through datasets.load_dataset(hub_id, hub_config): a local folder stands in for the
    hub here (nothing is downloaded), and the rows equal the JSONL branch's."""
    hub = DataConfig(source="hub", hub_id=str(gsm8k_dir), hub_config=None, limit_test=50)
    local = jsonl_cfg(gsm8k_dir, limit_test=50)
    assert load_prompts(hub, tok, "test").rows == load_prompts(local, tok, "test").rows


def test_over_long_prompts_are_dropped_and_counted(gsm8k_dir, tok):
    limit = 140
    out = load_prompts(jsonl_cfg(gsm8k_dir, limit_test=300, max_prompt_length=limit), tok, "test")
    assert 0 < out.n_dropped_too_long < 300
    assert len(out) + out.n_dropped_too_long == out.n_raw == 300
    assert all(len(r["prompt_ids"]) <= limit for r in out.rows)
    full = load_prompts(jsonl_cfg(gsm8k_dir, limit_test=300, max_prompt_length=4096), tok, "test")
    assert sum(len(r["prompt_ids"]) > limit for r in full.rows) == out.n_dropped_too_long
    with pytest.raises(ValueError):
        load_prompts(jsonl_cfg(gsm8k_dir, limit_test=20, max_prompt_length=8), tok, "test")  # nothing left


def test_think_format_and_system_prompt_override(gsm8k_dir, tok):
    think = load_prompts(jsonl_cfg(gsm8k_dir, limit_test=3, prompt_format="think"), tok, "test").rows[0]
    assert think["prompt"][0]["content"] == THINK_SYSTEM_PROMPT and "<think>" in think["prompt_text"]
    custom = load_prompts(jsonl_cfg(gsm8k_dir, limit_test=3, system_prompt="Be brief."), tok, "test").rows[0]
    assert custom["prompt_text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert build_messages("q", "think", "S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
    ]


def test_rows_without_gold_are_dropped(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    rows = [{"question": "a?", "answer": "x #### 3"}, {"question": "b?", "answer": "no gold"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = load_prompts(DataConfig(source="jsonl", train_path=str(path)), tok, "train")
    assert [r["gold"] for r in out.rows] == ["3"] and out.n_dropped_no_gold == 1


def _evaluate(p) -> int:
    a, b = p["a"], p["b"]
    return {"+": a + b, "-": a - b, "*": a * b}[p["op"]]


def test_arithmetic_problems():
    train = make_arithmetic_problems(500, seed=1, min_digits=2, max_digits=3, ops=["+", "-", "*"])
    assert train == make_arithmetic_problems(500, seed=1, min_digits=2, max_digits=3, ops=["+", "-", "*"])
    assert train != make_arithmetic_problems(500, seed=2, min_digits=2, max_digits=3, ops=["+", "-", "*"])
    for p in train:
        assert p["gold"] == str(_evaluate(p)) and int(p["gold"]) >= 0
        assert 10 <= p["a"] <= 999 and 10 <= p["b"] <= 999
        assert p["question"] == f"What is {p['a']} {p['op']} {p['b']}?"
        assert extract_gsm8k_gold(p["answer"]) == p["gold"]
    assert {p["op"] for p in train} == {"+", "-", "*"}
    assert {p["op"] for p in make_arithmetic_problems(50, seed=0, ops=["*"])} == {"*"}


def test_arithmetic_splits_are_disjoint_whatever_the_seeds():
    train = {p["question"] for p in make_arithmetic_problems(3000, seed=0, split="train")}
    test = {p["question"] for p in make_arithmetic_problems(300, seed=5, split="test")}
    assert train and test and not train & test


def test_arithmetic_solution_earns_every_reward():
    probs = make_arithmetic_problems(20, seed=0, ops=["+", "-", "*"])
    for fmt in ("reasoning", "think"):
        rs = RewardSet(dict.fromkeys(REFERENCE_REWARDS, 1.0), prompt_format=fmt)
        scores = rs(None, [arithmetic_solution_text(p, fmt) for p in probs], gold=[p["gold"] for p in probs])
        assert scores.total == [pytest.approx(4.0)] * len(probs)


def test_arithmetic_source_through_load_prompts(tok):
    cfg = DataConfig(source="arithmetic", arithmetic=ArithmeticConfig(n_train=64, n_test=16, max_digits=3))
    train, test = load_prompts(cfg, tok, "train"), load_prompts(cfg, tok, "test")
    assert len(train) == 64 and len(test) == 16
    assert not {r["question"] for r in train.rows} & {r["question"] for r in test.rows}
    assert train.rows[0]["prompt_text"].endswith("<|im_start|>assistant\n")


def test_prompt_dataset_order_and_resume():
    rows = [{"i": i} for i in range(10)]
    ds = PromptDataset(rows, seed=3)
    epoch0 = [r["i"] for r in ds.next_batch(10)]
    epoch1 = [r["i"] for r in ds.next_batch(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert ds.state_dict() == {"epoch": 2, "index": 0, "seed": 3}
    assert [r["i"] for r in PromptDataset(rows, seed=3).next_batch(20)] == epoch0 + epoch1
    assert [r["i"] for r in PromptDataset(rows, seed=4).next_batch(10)] != epoch0

    # Resume mid-epoch: a fresh dataset continues exactly where the saved one stopped.
    a = PromptDataset(rows, seed=3)
    a.next_batch(7)
    saved = a.state_dict()
    expected = [r["i"] for r in a.next_batch(6)]  # crosses into epoch 1
    b = PromptDataset(rows, seed=0)
    b.load_state_dict(saved)
    assert [r["i"] for r in b.next_batch(6)] == expected
    assert b.state_dict() == a.state_dict() == {"epoch": 1, "index": 3, "seed": 3}

    assert [r["i"] for r in PromptDataset(rows, shuffle=False).next_batch(12)] == [*range(10), 0, 1]
    with pytest.raises(ValueError):
        b.load_state_dict({"epoch": 0, "index": 10, "seed": 0})
    with pytest.raises(ValueError):
        PromptDataset([])
    with pytest.raises(ValueError):
        b.next_batch(0)


def test_sampling_rows_and_sft_pairs(gsm8k_dir, tok):
    rows = prompt_rows(tok, jsonl_cfg(gsm8k_dir, limit_test=10), limit=4, split="test")
    full = load_prompts(jsonl_cfg(gsm8k_dir, limit_test=10), tok, "test").rows
    assert [r["prompt"] for r in rows] == [r["prompt_text"] for r in full[:4]]
    assert [r["gold"] for r in rows] == [r["gold"] for r in full[:4]]

    cfg = DataConfig(source="arithmetic", prompt_format="think", arithmetic=ArithmeticConfig(n_test=50))
    pairs = arithmetic_sft_pairs(tok, cfg, 30, seed=2)
    assert len(pairs) == 30 and pairs == arithmetic_sft_pairs(tok, cfg, 30, seed=2)
    test_questions = {r["question"] for r in load_prompts(cfg, tok, "test").rows}
    rs = RewardSet(dict.fromkeys(REFERENCE_REWARDS, 1.0), prompt_format="think")
    for prompt, completion in pairs:
        assert prompt.endswith("<|im_start|>assistant\n") and THINK_SYSTEM_PROMPT in prompt
        question = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert question not in test_questions
        gold = completion.split("<answer>\n")[1].split("\n")[0]
        a, op, b = question.removeprefix("What is ").removesuffix("?").split(" ")
        assert str(_evaluate({"a": int(a), "op": op, "b": int(b)})) == gold
        assert rs(None, [completion], gold=[gold]).total == [pytest.approx(4.0)]


def test_gsm8k_solution_rewritten_into_the_format_earns_every_reward(gsm8k_dir):
    import json

    from trainer import rewards
    from trainer.data import extract_gsm8k_gold, gsm8k_solution_text

    row = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    gold = extract_gsm8k_gold(row["answer"])
    text = gsm8k_solution_text(row["answer"], gold)
    assert "<<" not in text and "####" not in text  # calculator annotations and the gold marker are gone
    assert text.startswith("<reasoning>\n") and text.endswith(f"<answer>\n{gold}\n</answer>\n")
    scores = {
        name: rewards.get_reward(name)(prompts=[None], completions=[text], gold=[gold])[0]
        for name in rewards.REFERENCE_REWARDS
    }
    assert scores == {
        "correctness": 2.0,
        "integer": 0.5,
        "strict_format": 0.5,
        "soft_format": 0.5,
        "xml_count": 0.5,
    }
