"""The UI server's JSON routes and run-folder reader, without a browser (the browser test is test_ui_browser.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from launch.ui import JsonlTail, RunReader, UISettings, completion_is_correct, create_app


def _write(path: Path, rows: list[dict], mode: str = "a") -> None:
    with path.open(mode) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jsonl_tail_reads_only_appended_complete_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.refresh() == []  # missing file: empty, no error
    _write(path, [{"step": 1}, {"step": 2}])
    assert [r["step"] for r in tail.refresh()] == [1, 2]
    with path.open("a") as f:
        f.write('{"step": 3}\n{"step": ')  # the trainer is mid-write
    assert [r["step"] for r in tail.refresh()] == [3]
    with path.open("a") as f:
        f.write("4}\nnot json\n")
    assert [r["step"] for r in tail.refresh()] == [4]
    assert tail.bad_lines == 1 and [r["step"] for r in tail.rows] == [1, 2, 3, 4]
    _write(path, [{"step": 10}], mode="w")  # rewritten (shorter): read again from the start
    tail.refresh()
    assert [r["step"] for r in tail.rows] == [10]


def test_completion_correctness_rules():
    assert completion_is_correct({"rewards": {"correctness": 2.0}}) is True
    assert (
        completion_is_correct(
            {"rewards": {"correctness": 0.0}, "completion": "<answer>5</answer>", "gold": "5"}
        )
        is False
    )
    # Without a correctness reward: our STRICT scorer against the gold answer.
    assert completion_is_correct({"completion": "<answer>5</answer>", "gold": "5"}) is True
    assert completion_is_correct({"completion": "the answer is 5", "gold": "5"}) is False
    assert completion_is_correct({"completion": "x"}) is None


def _run_folder(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    _write(
        run / "metrics.jsonl", [{"step": s, "reward/correctness": s / 10, "kl": "nan"} for s in range(1, 4)]
    )
    rows = []
    for step in (1, 3):
        for i in range(4):
            ok = i % 2 == 0
            rows.append(
                {
                    "step": step,
                    "completion": f"<reasoning>r</reasoning><answer>{7 if ok else 8}</answer>",
                    "gold": "7",
                    "rewards": {"correctness": 2.0 if ok else 0.0},
                }
            )
    _write(run / "completions.jsonl", rows)
    return run


def test_run_reader_filters(tmp_path):
    r = RunReader(_run_folder(tmp_path))
    r.refresh()
    s = r.summary()
    assert s["last_step"] == 3 and [x["step"] for x in s["completion_steps"]] == [1, 3]
    latest = r.completion_rows(None, "all", 50, 0)
    assert latest["step"] == 3 and latest["counts"] == {"all": 4, "correct": 2, "incorrect": 2}
    bad = r.completion_rows(1, "incorrect", 50, 0)
    assert bad["total"] == 2 and all(x["correct"] is False for x in bad["rows"])
    assert r.metric_rows()[0]["kl"] is None  # the logger's "nan" string is not plotted


def test_routes_and_errors(tmp_path):
    run = _run_folder(tmp_path)
    client = TestClient(create_app(UISettings(run_dir=str(run))))
    assert client.get("/").status_code in (200, 307)
    assert "Chat" in client.get("/chat.html").text and "Run" in client.get("/run.html").text
    cfg = client.get("/api/config").json()
    assert cfg["run_dir"] == str(run) and cfg["system_prompts"] and all(cfg["system_prompts"].values())
    m = client.get("/api/run/metrics", params={"run_dir": str(run), "since": 1}).json()
    assert m["total"] == 3 and [r["step"] for r in m["rows"]] == [2, 3]
    c = client.get(
        "/api/run/completions", params={"run_dir": str(run), "step": 1, "filter": "correct"}
    ).json()
    assert c["total"] == 2
    # Bad input gives a readable error, not a crash.
    r = client.get("/api/run", params={"run_dir": str(tmp_path / "nope")})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    (tmp_path / "empty").mkdir()
    r = client.get("/api/run", params={"run_dir": str(tmp_path / "empty")})
    assert r.status_code == 404 and "metrics.jsonl" in r.json()["error"]
    dead = f"http://127.0.0.1:{_closed_port()}"
    r = client.get("/api/models", params={"server_url": dead})
    assert r.status_code == 502 and "cannot reach" in r.json()["error"]
    assert client.get("/api/models", params={"server_url": "ftp://x"}).status_code == 400
    body = {"server_url": dead, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with client.stream("POST", "/api/chat", json=body) as r:
        text = "".join(r.iter_text())
    event = json.loads(text.strip().removeprefix("data:"))
    assert "ConnectError" in event["error"]


@pytest.mark.parametrize("bad", [{"messages": []}, {"max_tokens": 0}, {"temperature": -1}])
def test_chat_body_validation(bad):
    client = TestClient(create_app(UISettings()))
    body = {"server_url": "http://127.0.0.1:1", "messages": [{"role": "user", "content": "hi"}], **bad}
    assert client.post("/api/chat", json=body).status_code == 422
