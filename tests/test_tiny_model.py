"""The tiny offline model kit: reload through from_pretrained gives identical ids and logits, the chat
template renders Qwen ChatML, building is deterministic, and generation stops at <|im_end|>."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.tiny_model import (
    FORMAT_TAGS,
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_tiny_model,
    tokenizer_corpus,
    train_tokenizer,
)


def _gsm8k_strings(gsm8k_dir: Path, n: int = 300) -> list[str]:
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)
    out = []
    for row in rng.sample(rows, n):
        out += [row["question"], row["answer"]]
    return out


TRICKY = [
    "",
    " ",
    "\n",
    "  leading and trailing spaces  ",
    "12345678901234567890 1,200 $1,200.50 -3.5e10 0.0001",
    "tabs\tand\r\nwindows newlines\n\n\n   three blank",
    "<reasoning>\n48/2 = 24\n</reasoning>\n<answer>\n72\n</answer>\n",
    "<think>x</think><answer>7</answer>trailing",
    "<reasoning><reasoning>nested</reasoning></reasoning>",
    f"{IM_START}user\nWhat is 2+2?{IM_END}\n{IM_START}assistant\n",
    f"text{PAD_TOKEN}{PAD_TOKEN}more",
    "unicode: café ≥ 3 × 4 ÷ 2 — “quotes” 日本語 🙂",
    "<<48/2=24>>24 clips\n#### 72",
    "don't we'll I'M they've",
]


def test_reload_gives_identical_token_ids(tiny_model_dir, gsm8k_dir):
    """transformers 5 may rebuild the pipeline on reload (it picks Qwen2Tokenizer for a qwen2 config):
    the in-memory tokenizer that build_tiny_model trained and the reloaded one must give the same ids."""
    raw = train_tokenizer(tokenizer_corpus(gsm8k_dir), vocab_size=1024)  # what build_tiny_model trains
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = _gsm8k_strings(gsm8k_dir) + TRICKY
    for text in texts:
        ids_raw = raw.encode(text, add_special_tokens=False).ids
        ids_hf = hf.encode(text, add_special_tokens=False)
        assert ids_raw == ids_hf, text
        assert hf.encode(text) == ids_hf, "the tokenizer must not add BOS/EOS on its own"
        assert hf.decode(ids_hf) == text, text
        assert raw.decode(ids_raw, skip_special_tokens=False) == text, text
    # Same pipeline after reload: normalizer, pre-tokenizer, decoder, vocab, merges and added tokens.
    a, b = json.loads(raw.to_str()), json.loads(hf.backend_tokenizer.to_str())
    for key in ["normalizer", "pre_tokenizer", "decoder", "added_tokens"]:
        assert a[key] == b[key], key
    assert a["model"]["vocab"] == b["model"]["vocab"] and a["model"]["merges"] == b["model"]["merges"]
    assert Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).to_str() == raw.to_str()


def test_special_tokens_and_tags_are_single_ids(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for t in [PAD_TOKEN, IM_START, IM_END, *FORMAT_TAGS]:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1, (t, ids)
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= 1024
    # Tags are ordinary added tokens: they survive skip_special_tokens; the ChatML markers do not.
    ids = tok.encode(f"<answer>\n7\n</answer>{IM_END}", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<answer>\n7\n</answer>"
    # Digits are split one per token (as in Qwen), so numbers are never merged into one id.
    assert len(tok.encode("123456", add_special_tokens=False)) == 6


def test_model_config_and_generation_config_agree(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert model.config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(PAD_TOKEN)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size >= len(tok)


def test_chat_template_renders_chatml(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{IM_START}system\nSYS{IM_END}\n{IM_START}user\nWhat is 2+2?{IM_END}\n{IM_START}assistant\n"
    )
    assert text.endswith(f"{IM_START}assistant\n")
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == text[: -len(f"{IM_START}assistant\n")]
    # Without a system turn the Qwen default one is inserted.
    user_only = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True)
    assert user_only.startswith(f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n")
    # A full conversation: the assistant turn is closed with <|im_end|>.
    full = tok.apply_chat_template(
        [*msgs, {"role": "assistant", "content": "<answer>4</answer>"}], tokenize=False
    )
    assert full.endswith(f"{IM_START}assistant\n<answer>4</answer>{IM_END}\n")


def test_build_is_deterministic_and_seed_changes_weights(tmp_path, gsm8k_dir):
    a = build_tiny_model(tmp_path / "a", gsm8k_dir=gsm8k_dir, seed=3)
    b = build_tiny_model(tmp_path / "b", gsm8k_dir=gsm8k_dir, seed=3)
    c = build_tiny_model(tmp_path / "c", gsm8k_dir=gsm8k_dir, seed=4)
    for name in ["tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_reload_gives_identical_logits(tmp_path, gsm8k_dir):
    """The in-memory model and the reloaded one compute the same logits; greedy generate stops cleanly."""
    out = build_tiny_model(tmp_path / "m", gsm8k_dir=gsm8k_dir, seed=0, hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(["Natalia sold 48 clips.", "<answer>\n72\n</answer>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        la = model(**enc).logits  # [B, T, V]
        lb = again(**enc).logits  # [B, T, V]
    assert la.shape == (2, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.equal(la, lb)
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()  # tied, like 0.5B
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)  # [B, T + <=8]
    assert gen.shape[0] == 2 and gen.shape[1] <= enc["input_ids"].shape[1] + 8


def test_arithmetic_corpus_without_gsm8k(tmp_path):
    out = build_tiny_model(tmp_path / "m", gsm8k_dir=None, seed=0)
    tok = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TRICKY + [
        "What is 37 + 48?",
        "<reasoning>\n37 + 48 = 85\n</reasoning>\n<answer>\n85\n</answer>\n",
    ]:
        assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text


def test_vocab_size_too_small_is_rejected():
    with pytest.raises(ValueError):
        train_tokenizer(iter(["abc"]), vocab_size=100)


def test_cli_builds_a_loadable_model(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.tiny_model",
            "--out",
            str(out),
            "--hidden-size",
            "32",
            "--num-layers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 1
    assert AutoTokenizer.from_pretrained(out).eos_token == IM_END
