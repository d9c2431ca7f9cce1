"""The web UI in a real browser (Debian's Chromium, headless) against a real rollout server and a run folder.

The rollout server serves the tiny model after a few seconds of supervised training on formatted arithmetic
answers (trainer/sft.py), so its answers contain the reasoning and answer tags the page must style. The run
folder is a synthetic metrics.jsonl / completions.jsonl written here in the trainer's format (the shapes
trainer/metrics_log.py writes), appended to while the page is open to check the live refresh.
Screenshots go to artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rollout_server.spawn import free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not up after {timeout_s}s:\n{log.read_text()[-3000:]}")


def _start(cmd: list[str], health_url: str, log: Path, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    _wait_http(health_url, proc, timeout_s, log)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def formatted_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after a short supervised pass on '<reasoning>..</reasoning><answer>..</answer>' answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launch.ui import system_prompts
    from trainer.sft import SFTExample, train_sft

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    system = system_prompts()["reasoning"]
    rng = random.Random(0)
    examples = []
    for _ in range(256):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"What is {a} + {b}?"}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        completion = f"<reasoning>\n{a} + {b} = {a + b}.\n</reasoning>\n<answer>\n{a + b}\n</answer>"
        examples.append(SFTExample(prompt=prompt, completion=completion))
    torch.manual_seed(0)
    train_sft(model, tok, examples, epochs=3, lr=3e-3, batch_size=16, log_every=0)
    out = tmp_path_factory.mktemp("formatted-model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rollout_url(formatted_model_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "rollout_server",
        "--model",
        str(formatted_model_dir),
        "--backend",
        "torch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    url = f"http://127.0.0.1:{port}"
    proc = _start(cmd, url + "/health", log, timeout_s=180)
    yield url
    _stop(proc)


def _metric_row(step: int, rng: random.Random) -> dict:
    """One metrics.jsonl row with the keys trainer/rollout_side.py and trainer/loop.py write."""
    acc = min(1.0, step / 30 + rng.random() * 0.1)
    row = {"step": step}
    means = {
        "correctness": 2 * acc,
        "strict_format": 0.5 * acc,
        "soft_format": 0.4 * acc + 0.1,
        "xml_count": 0.3 * acc,
        "integer": 0.5 * acc,
    }
    for name, v in means.items():
        row[f"reward/{name}/mean"], row[f"reward/{name}/std"] = v, 0.1
    row["reward/total/mean"] = sum(means.values())
    row.update(
        {
            "accuracy": acc,
            "completion_length/mean": 90.0 + step,
            "completion_length/max": 200.0,
            "truncated/frac": 0.05,
            "kl": 0.001 * step,
            "entropy": 1.2 - step / 100,
            "grad_norm": "nan" if step == 3 else 0.5,  # the logger writes non-finite floats as strings
        }
    )
    return row


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run folder in the trainer's file format (no real trainer run is used here)."""
    run = tmp_path / "runs" / "synthetic"
    run.mkdir(parents=True)
    rng = random.Random(0)
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(1, 21):
            f.write(json.dumps(_metric_row(step, rng)) + "\n")
    with (run / "completions.jsonl").open("w") as f:
        for step in (10, 20):
            for i in range(6):
                ok = i % 3 != 2  # 4 correct, 2 incorrect per step
                answer = 7 if ok else 8
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "group": i // 3,
                            "index": i,
                            "weight_version": step,
                            "prompt_text": "<|im_start|>user\nTom has 3 apples and buys 4 more. How many?<|im_end|>\n",
                            "completion": f"<reasoning>\nTom has 3 apples and buys 4: 3 + 4 = {answer}.\n</reasoning>\n"
                            f"<answer>\n{answer}\n</answer>",
                            "gold": "7",
                            "reward": 3.0 if ok else 1.0,
                            "advantage": 0.5 if ok else -1.0,
                            "rewards": {"correctness": 2.0 if ok else 0.0, "strict_format": 0.5},
                            "num_tokens": 30,
                            "finish_reason": "stop",
                        }
                    )
                    + "\n"
                )
    return run


@pytest.fixture()
def ui_url(rollout_url, run_dir, tmp_path):
    port = free_port()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: the page must show an error
    cmd = [
        sys.executable,
        "-m",
        "launch.ui",
        "--port",
        str(port),
        "--server-url",
        rollout_url,
        "--server-url",
        dead,
        "--run-dir",
        str(run_dir),
        "--poll-interval",
        "1",
    ]
    url = f"http://127.0.0.1:{port}"
    proc = _start(cmd, url + "/api/config", tmp_path / "ui.log", timeout_s=60)
    yield url
    _stop(proc)


@pytest.fixture()
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        pg = browser.new_page(viewport={"width": 1360, "height": 900})
        pg.set_default_timeout(60_000)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        yield pg
        browser.close()
        assert not errors, f"JavaScript errors: {errors}"


def test_chat_proxy_streams_from_real_server(rollout_url, ui_url):
    """The UI's /api/chat relays the server's SSE stream chunk by chunk."""
    body = {
        "server_url": rollout_url,
        "messages": [{"role": "user", "content": "What is 12 + 30?"}],
        "max_tokens": 24,
    }
    deltas = []
    with httpx.stream("POST", ui_url + "/api/chat", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                delta = json.loads(line[5:])["choices"][0]["delta"].get("content")
                if delta:
                    deltas.append(delta)
    assert len(deltas) > 3, deltas


def _style(page, selector: str, prop: str) -> str:
    return page.eval_on_selector(selector, f"el => getComputedStyle(el).{prop}")


def test_chat_page(page, ui_url):
    page.goto(ui_url + "/chat.html")
    page.wait_for_function(
        "document.getElementById('model-a').textContent.length > 0 && "
        "!document.getElementById('model-a').textContent.includes('checking')"
    )
    assert page.text_content("#model-a") != "unreachable"
    # Model B points at a dead port: a visible error, no crash.
    page.wait_for_selector("#page-error:not(.hidden)")
    assert "Model B" in page.text_content("#page-error")
    page.fill("#question", "What is 12 + 30?")
    page.click("#send")
    page.wait_for_selector("#transcript-a .bubble.assistant .meta:not(:empty)")
    page.wait_for_selector("#transcript-b .bubble.assistant .error")
    # Reasoning: dimmed and collapsible; answer: bold.
    reasoning = "#transcript-a details.reasoning"
    page.wait_for_selector(reasoning, state="attached")
    assert float(_style(page, reasoning, "opacity")) < 0.9
    answer = "#transcript-a .answer"
    assert int(_style(page, answer, "fontWeight")) >= 600
    assert page.text_content(answer).strip()
    was_open = page.eval_on_selector(reasoning, "d => d.open")
    page.click(reasoning + " > summary")  # collapsible: a click folds it, another unfolds it
    assert page.eval_on_selector(reasoning, "d => d.open") != was_open
    page.click(reasoning + " > summary")
    assert page.eval_on_selector(reasoning, "d => d.open") == was_open
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)


def test_run_page(page, ui_url, run_dir):
    page.goto(ui_url + "/run.html")
    page.wait_for_selector('[data-chart="rewards"] path.series')
    legend = page.text_content('[data-chart="rewards"] .legend')
    for name in ("correctness", "strict_format", "soft_format", "xml_count", "integer", "total"):
        assert name in legend
    assert "std" not in legend
    for chart in ("accuracy", "length", "kl"):
        assert page.locator(f'[data-chart="{chart}"] path.series').count() >= 1, chart
    # Latest step's completions, then the filters.
    page.wait_for_selector("#cards .card")
    assert page.locator("#cards .card").count() == 6
    assert float(_style(page, "#cards .card details.reasoning", "opacity")) < 0.9
    assert int(_style(page, "#cards .card .answer", "fontWeight")) >= 600
    page.click('#filters button[data-filter="correct"]')
    page.wait_for_function("document.querySelectorAll('#cards .card').length === 4")
    assert page.locator("#cards .card.incorrect").count() == 0
    page.click('#filters button[data-filter="incorrect"]')
    page.wait_for_function("document.querySelectorAll('#cards .card').length === 2")
    assert page.locator("#cards .card.correct").count() == 0
    page.select_option("#step", "10")
    page.wait_for_function("document.querySelectorAll('#cards .card').length === 2")
    page.click('#filters button[data-filter="all"]')
    page.wait_for_function("document.querySelectorAll('#cards .card').length === 6")
    page.screenshot(path=str(ARTIFACTS / "run.png"), full_page=True)
    # Live: rows appended while the page is open appear without a reload.
    rng = random.Random(1)
    with (run_dir / "metrics.jsonl").open("a") as f:
        for step in range(21, 26):
            f.write(json.dumps(_metric_row(step, rng)) + "\n")
    page.wait_for_function(
        "document.getElementById('status-text').textContent.includes('step 25')", timeout=15_000
    )
    assert "25" in page.text_content('[data-chart="accuracy"] svg')  # the x axis grew


def test_run_page_errors(page, ui_url, tmp_path):
    page.goto(ui_url + "/run.html?run_dir=" + str(tmp_path / "no-such-run"))
    page.wait_for_selector("#run-error:not(.hidden)")
    assert "not found" in page.text_content("#run-error")
    page.screenshot(path=str(ARTIFACTS / "run-missing-folder.png"))


@pytest.fixture(scope="module")
def real_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder written by a real trainer run (3 GRPO steps of the tiny model against a real server)."""
    from tests.trainer_support import read_log, rollout_server, start_trainer, wait_all

    out = tmp_path_factory.mktemp("real-run")
    with rollout_server(tiny_model_dir, out / "server.log") as (url, _server):
        overrides = [
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={out}",
            "run.name=real",
            f"rollout.server_urls=[{url}]",
            "logging.tensorboard=false",
            "logging.completions_every_steps=1",
            "optim.max_steps=3",
            "checkpoint.every_steps=0",
        ]
        codes = wait_all(start_trainer(1, "configs/cpu-tiny-test.yaml", overrides, out), timeout_s=240)
    assert codes == [0], read_log(out)
    return out / "real"


def test_run_page_on_a_real_trainer_run(page, ui_url, real_run_dir):
    """The Run page reads what the trainer really writes (not only the synthetic folder above)."""
    page.goto(ui_url + "/run.html?run_dir=" + str(real_run_dir))
    page.wait_for_function(
        "document.getElementById('status-text').textContent.includes('step 3')", timeout=30_000
    )
    # A random tiny model earns ~no reward: flat series at 0 (zero-height paths, hence state="attached").
    page.wait_for_selector('[data-chart="rewards"] path.series', state="attached")
    legend = page.text_content('[data-chart="rewards"] .legend')
    for name in ("correctness", "strict_format", "soft_format", "xml_count", "integer", "total"):
        assert name in legend, legend
    for chart in ("rewards", "accuracy", "length"):
        paths = page.locator(f'[data-chart="{chart}"] path.series')
        assert paths.count() >= 1, chart
        for i in range(paths.count()):  # every point has real coordinates (a constant series once gave NaN)
            d = paths.nth(i).get_attribute("d")
            assert d and "NaN" not in d, (chart, d)
    page.wait_for_selector("#cards .card")
    assert page.locator("#cards .card").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "run-real-trainer.png"), full_page=True)
