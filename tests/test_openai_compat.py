"""The OpenAI routes as a new user meets them: the official `openai` SDK against a real server, both backends.

`stream_options.include_usage` (chat and completions), log-probs with top-k alternatives (chat `top_logprobs`,
completions' legacy `logprobs: k`), token strings that are text (not byte-level symbols such as 'Ċ'), the
penalties vLLM supports passed through (the torch backend answers a 400 naming the parameter) and OpenAI-shaped
400s for what is not supported (`logit_bias`). The servers are real `python -m rollout_server` processes on the
tiny model (helpers of test_rollout_server.py); vLLM is skipped where it is not installed.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.test_rollout_server import BACKENDS, TOKEN, start_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MESSAGES = [
    {"role": "user", "content": "Natalia sold clips to 48 of her friends.\nHow many  clips?\n\n Answer:"}
]
PROMPT = "Natalia sold clips to 48 of her friends.\n  How many clips did she sell?\n"


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(tiny_model_dir, backend):
    proc, url, _lines = start_server(tiny_model_dir, "--api-token", TOKEN, backend=backend)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    client = openai.OpenAI(base_url=server + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def generate(server: str, **body) -> list[dict]:
    r = httpx.post(server + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["completions"]


def full_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax(logits) at every completion position (greedy: no temperature, no truncation). [C, V]"""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()  # [T, V]
    return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # [C, V]


# ---- stream_options.include_usage ---------------------------------------------------------------------------
def test_chat_stream_include_usage(oai):
    kw = dict(model="m", messages=MESSAGES, max_tokens=12, temperature=0)
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": full.usage.prompt_tokens,
        "completion_tokens": full.usage.completion_tokens,
        "total_tokens": full.usage.prompt_tokens + full.usage.completion_tokens,
    }
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    plain = list(oai.chat.completions.create(**kw, stream=True))  # without the option: no usage chunk
    assert all(c.choices and c.usage is None for c in plain)


def test_completions_stream_include_usage(oai):
    kw = dict(model="m", prompt=[PROMPT, "What is 7 + 5?"], n=2, max_tokens=10, temperature=1.0, seed=5)
    full = oai.completions.create(**kw)
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        full.usage.prompt_tokens,
        full.usage.completion_tokens,
        full.usage.total_tokens,
    )
    assert all(c.object == "text_completion" and c.usage is None and len(c.choices) == 1 for c in body)
    texts, finish = {}, {}
    for c in body:
        ch = c.choices[0]
        texts[ch.index] = texts.get(ch.index, "") + ch.text
        finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert sorted(texts) == [0, 1, 2, 3]  # prompt-major: prompt i, sample j -> index i * n + j
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in full.choices]


# ---- log-probs ----------------------------------------------------------------------------------------------
def test_token_texts_concatenate_to_the_text(hf):
    """Unit: token ids -> OpenAI token strings, on the fast (byte-level) path and the generic windowed one."""
    from rollout_server.openai_api import TokenTexts

    _model, tok = hf
    text = "Hello world\n\n  x = 3 é 😀 <answer>42</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    fast = TokenTexts(tok)
    assert fast.byte_level
    pieces, raw = fast.pieces(ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert b"".join(raw) == text.encode() and pieces[-1] == "" and raw[-1] == b""  # EOS: skipped in the text
    assert (
        "" in pieces[:-1]
    )  # a token that ends inside 'é' or the emoji adds nothing until the character is whole
    assert fast.alternative(tok.eos_token_id)[0] == tok.eos_token  # alternatives: special tokens by name
    assert fast.alternative(ids[6]) == ("\n", b"\n")
    generic = TokenTexts(tok)
    generic.byte_level = False  # the path of tokenizers whose bytes cannot be read off the vocabulary
    g_pieces, g_raw = generic.pieces(ids)
    assert "".join(g_pieces) == text and b"".join(g_raw) == text.encode()
    cut = ids[: ids.index(tok.convert_tokens_to_ids("Ã"), 0) + 1]  # ends inside 'é': decode shows U+FFFD
    assert "".join(fast.pieces(cut)[0]) == "".join(generic.pieces(cut)[0]) == tok.decode(cut)


def check_alternatives(entry, k: int) -> None:
    alts = entry.top_logprobs
    assert len(alts) == k
    values = [a.logprob for a in alts]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert all(isinstance(a.token, str) and "Ġ" not in a.token and "Ċ" not in a.token for a in alts)


def test_chat_top_logprobs_match_generate_and_reference(oai, server, hf):
    model, tok = hf
    out = oai.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for e in content:
        check_alternatives(e, 3)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)  # greedy: the top token
    prompt = chat_ids(tok)
    native = generate(server, prompt_token_ids=[prompt], max_tokens=10, temperature=0, top_logprobs=3)[0]
    assert [e.logprob for e in content] == pytest.approx(native["logprobs"], abs=1e-5)
    assert [lp for pos in native["top_logprobs"] for _, lp in pos] == pytest.approx(
        [a.logprob for e in content for a in e.top_logprobs], abs=1e-5
    )
    # the same model in the test process: alternatives are the top 3 of log_softmax(logits)
    ref = full_logprobs(model, prompt, native["token_ids"])  # [C, V]
    for j, pos in enumerate(native["top_logprobs"]):
        assert pos[0][0] == native["token_ids"][j]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in pos], dtype=torch.float64), ref[j].topk(3).values, atol=1e-4, rtol=0
        )
        for t, lp in pos:  # ties may order equal values differently: check each id's own value
            assert lp == pytest.approx(float(ref[j, t]), abs=1e-4)


def test_seeded_sample_logprobs_match_generate(oai, server, hf):
    _model, tok = hf
    out = oai.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=21, logprobs=True, top_logprobs=2
    )
    native = generate(server, prompt_token_ids=[chat_ids(tok)], max_tokens=12, temperature=1.0, seed=21)[0]
    assert "top_logprobs" not in native  # not asked: the trainer's wire is unchanged
    assert out.choices[0].message.content == native["text"]
    content = out.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(native["logprobs"], abs=1e-5)
    for e in content:
        check_alternatives(e, 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_token_strings_are_text(oai, seed):
    out = oai.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=24, temperature=1.0, seed=seed, logprobs=True, top_logprobs=1
    )
    text = out.choices[0].message.content
    content = out.choices[0].logprobs.content
    assert "".join(e.token for e in content) == text
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace") == text
    legacy = oai.completions.create(
        model="m", prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed, logprobs=2
    )
    c = legacy.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == legacy.usage.completion_tokens
    for tok_text, tok_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 0 < len(top) <= 3 and top[tok_text] == pytest.approx(tok_lp)  # the k best + the sampled one
        assert all(v <= 0 for v in top.values())


def test_stream_carries_logprobs(oai):
    kw = dict(model="m", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    full = oai.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [
        e
        for c in oai.chat.completions.create(**kw, stream=True)
        for ch in c.choices
        if ch.logprobs
        for e in ch.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full]


def test_logprob_limits(oai):
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=21)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="m", messages=MESSAGES, top_logprobs=2, max_tokens=2)
    assert info.value.param == "top_logprobs" and "logprobs" in info.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
        oai.completions.create(model="m", prompt="a", logprobs=6)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="m", messages=MESSAGES, stream_options={"include_usage": True})
    assert info.value.param == "stream_options"


# ---- penalties and logit_bias -------------------------------------------------------------------------------
def test_penalties(oai, server, backend):
    kw = dict(model="m", messages=MESSAGES, max_tokens=16, temperature=0)
    if backend == "vllm":
        neutral = oai.chat.completions.create(**kw, logprobs=True).choices[0]
        penalised = oai.chat.completions.create(**kw, logprobs=True, presence_penalty=0.5).choices[0]
        # the log-probs are those of the penalised distribution: equal at the first token (nothing generated
        # yet to penalise), different after it (a different token, or the same one made less likely)
        lp0 = [(e.token, e.logprob) for e in neutral.logprobs.content]
        lp1 = [(e.token, e.logprob) for e in penalised.logprobs.content]
        assert lp1[0] == (lp0[0][0], pytest.approx(lp0[0][1], abs=1e-5))
        assert all(a != b for a, b in zip(lp0[1:], lp1[1:], strict=False))
        strong = oai.chat.completions.create(**kw, presence_penalty=2.0).choices[0].message.content
        assert (
            strong != neutral.message.content
        )  # the tiny model's logits are nearly flat: 2 changes the text
        both = oai.chat.completions.create(
            **kw, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3}, logprobs=True
        )
        assert both.usage.completion_tokens >= 1 and all(
            e.logprob <= 0 for e in both.choices[0].logprobs.content
        )
        text = oai.completions.create(model="m", prompt=PROMPT, max_tokens=8, presence_penalty=-1.0)
        assert text.choices[0].text is not None
        assert generate(server, prompts=[PROMPT], max_tokens=4, presence_penalty=0.5)[0]["token_ids"]
        return
    cases = [
        ("presence_penalty", lambda: oai.chat.completions.create(**kw, presence_penalty=0.5)),
        ("frequency_penalty", lambda: oai.completions.create(model="m", prompt="a", frequency_penalty=1.0)),
        (
            "repetition_penalty",
            lambda: oai.chat.completions.create(**kw, extra_body={"repetition_penalty": 1.2}),
        ),
        (
            "presence_penalty",
            lambda: list(oai.chat.completions.create(**kw, stream=True, presence_penalty=1.0)),
        ),
    ]
    for name, call in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert name in info.value.message and "torch backend" in info.value.message
        assert info.value.param == name and info.value.body["param"] == name
    r = httpx.post(server + "/generate", json={"prompts": ["a"], "presence_penalty": 0.5}, timeout=60)
    assert r.status_code == 400 and "presence_penalty" in r.json()["error"]
    assert oai.chat.completions.create(
        **kw, presence_penalty=0, frequency_penalty=0
    ).choices  # neutral is fine


def test_logit_bias_refused(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, logit_bias={"5": 10})
    assert info.value.param == "logit_bias" and "logit_bias" in info.value.message
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.completions.create(model="m", prompt="a", max_tokens=2, logit_bias={"5": -100})
    assert oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, logit_bias={}).choices
