"""Shared fixtures: paths to the local GSM8K copy and a tiny offline model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: with 2 threads torch was 10-100x slower at random on our 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K is expected at {GSM8K_DIR} (the shared data folder beside the checkout)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-architecture model + locally trained tokenizer, saved as a normal HF directory."""
    from trainer.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, gsm8k_dir=GSM8K_DIR, seed=0)
    return out
