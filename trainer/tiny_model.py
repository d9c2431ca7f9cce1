"""Build a tiny, offline Qwen2-architecture model and a locally trained tokenizer.

Why: tests and the CPU demo need a real Hugging Face model directory (``from_pretrained`` works, the chat
template renders, generation stops at ``<|im_end|>``) without downloading anything. The model is a
randomly initialised ``Qwen2ForCausalLM``; the tokenizer is a byte-level BPE trained here with the
``tokenizers`` library on GSM8K text (or, without GSM8K, on generated arithmetic text).

The tokenizer pipeline copies Qwen2's exactly (NFC normalizer, Qwen's pre-tokenizer regex that splits
every digit on its own, byte-level alphabet, byte-level decoder), so whatever class transformers uses to
reload it, the ids are the same. It is saved as ``PreTrainedTokenizerFast`` (transformers loads
``tokenizer.json`` as is) and tests check the reload gives identical ids.

Special tokens follow Qwen: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos). The
answer-format tags (``<reasoning>``, ``</reasoning>``, ``<answer>``, ``</answer>``, ``<think>``,
``</think>``) are added tokens (one id each, not special: they survive ``skip_special_tokens``).

Deterministic: the same arguments give the same files (same vocab, merges and weights).

CLI: ``python -m trainer.tiny_model --out DIR [--seed 0] [--gsm8k-dir DIR] [--hidden-size 64] ...``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
FORMAT_TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "<think>", "</think>"]

# Same as Qwen2's tokenizer: contractions, words, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-style ChatML template (no tool calls): a default system turn when none is given, and
# `add_generation_prompt` appends the assistant header.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Text every corpus gets, so the prompts and answer formats our tasks use tokenize compactly.
_FORMAT_CORPUS = [
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.",
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n",
    "<think>\nLet me solve this step by step.\n</think>\n<answer>\n42\n</answer>",
    "You are a helpful assistant.",
]


def arithmetic_corpus(n: int = 4000, seed: int = 1234) -> Iterator[str]:
    """Generated arithmetic word problems and worked answers: the tokenizer corpus when GSM8K is absent."""
    rng = random.Random(seed)
    names = ["Tom", "Ann", "Maria", "James", "Lee", "Sara", "Ravi", "Olga", "Ken", "Natalia"]
    items = ["apples", "books", "dollars", "marbles", "cookies", "pens", "cards", "eggs", "miles", "hours"]
    ops = [
        ("+", "plus", lambda a, b: a + b),
        ("-", "minus", lambda a, b: a - b),
        ("*", "times", lambda a, b: a * b),
    ]
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        sym, word, fn = rng.choice(ops)
        name, item = rng.choice(names), rng.choice(items)
        c = fn(a, b)
        yield f"What is {a} {sym} {b}?"
        yield f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        yield f"<reasoning>\n{a} {word} {b}: {a} {sym} {b} = {c}.\n</reasoning>\n<answer>\n{c}\n</answer>\n"
        yield f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}.\n#### {a + b}"


def gsm8k_corpus(gsm8k_dir: Path) -> Iterator[str]:
    """Questions and answers of GSM8K's train split (the test split stays unseen)."""
    with open(Path(gsm8k_dir) / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield row["question"]
                yield row["answer"]


def tokenizer_corpus(gsm8k_dir: str | Path | None = None) -> Iterator[str]:
    """The tokenizer's training text: the answer-format snippets, then GSM8K train (or arithmetic text)."""
    yield from _FORMAT_CORPUS
    yield from gsm8k_corpus(Path(gsm8k_dir)) if gsm8k_dir is not None else arithmetic_corpus()


def train_tokenizer(corpus: Iterator[str], vocab_size: int):
    """Train a Qwen2-style byte-level BPE; returns a ``tokenizers.Tokenizer`` of at most ``vocab_size`` ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    n_extra = len(SPECIAL_TOKENS) + len(FORMAT_TAGS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + n_extra + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + n_extra + 1}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False / use_regex=False as in Qwen's tokenizer.json; it only affects offsets.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_extra,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    # Appended after training, as in Qwen (special tokens sit at the end of the vocab).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TAGS])
    return tok


# Head sizes vLLM 0.32's CPU attention accepts; a tiny model meant for vLLM must use one of them.
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def build_tiny_model(
    out_dir: str | Path,
    gsm8k_dir: str | Path | None = None,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a tiny Qwen2 model + tokenizer + generation config to ``out_dir`` and return its path.

    The tokenizer is trained on ``gsm8k_dir/train.jsonl`` (questions + answers) when given, else on
    generated arithmetic text; the model's embedding has ``vocab_size`` rows (>= the tokenizer's length,
    like Qwen's padded vocab). Weights are drawn from a private RNG seeded with ``seed`` (the global torch
    RNG is left untouched). The default 2 heads of 64/2 = 32 dimensions is a head size vLLM's CPU attention
    accepts (it refuses 16: see VLLM_HEAD_SIZES).
    """
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(tokenizer_corpus(gsm8k_dir), vocab_size)
    pad_id, eos_id = tok.token_to_id(PAD_TOKEN), tok.token_to_id(IM_END)
    assert tok.get_vocab_size() <= vocab_size, (tok.get_vocab_size(), vocab_size)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        model_max_length=max_position_embeddings,
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(out)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B / 1.5B
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(out)
    return out


def ensure_tiny_model(out_dir: str | Path, options) -> Path:
    """Build the tiny model into ``out_dir`` once, atomically; ``options`` has the fields of the config's
    ``model.tiny`` section (gsm8k_dir, seed, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads).

    Why atomic (temporary folder, then rename): the launcher and the trainer both look for ``config.json``
    here, and a half-built folder left by a crash must never be mistaken for a model.
    """
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted build
    build_tiny_model(
        tmp,
        gsm8k_dir=options.gsm8k_dir,
        seed=options.seed,
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        num_layers=options.num_layers,
        num_heads=options.num_heads,
        num_kv_heads=options.num_kv_heads,
    )
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline Qwen2 model + local BPE tokenizer.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--gsm8k-dir", default=None, help="folder with train.jsonl for the tokenizer corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-kv-heads", type=int, default=1)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    a = p.parse_args(argv)
    out = build_tiny_model(
        a.out,
        gsm8k_dir=a.gsm8k_dir,
        seed=a.seed,
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        intermediate_size=a.intermediate_size,
        max_position_embeddings=a.max_position_embeddings,
    )
    print(out)


if __name__ == "__main__":
    main()
