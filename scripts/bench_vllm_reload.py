"""Where vLLM CPU's weight reload spends its time, once the buckets have arrived (part of `make bench-rollout`).

Runs vLLM in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on a ~90M-parameter random Qwen2 with tied
embeddings, and times the steps our gloo transfer engine runs for every update (`rollout_server/
vllm_gloo_engine.py`): vLLM's `initialize_layerwise_reload`, `model.load_weights` (each layer is
re-materialised, loaded and re-processed; on CPU that re-packs every linear weight into a oneDNN GEMM handle),
`finalize_layerwise_reload`, and our `refresh_cpu_embedding_gemms`. It then profiles one load to split it into
the re-packing and the copies, and times the refresh of every embedding-shaped layer against the refresh of the
stale ones only (what the engine does), alternating. A plain copy of the same bytes gives the scale.

    python scripts/bench_vllm_reload.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model lives in this process: time it directly
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402


def model_dir(hidden: int, layers: int, vocab: int) -> tuple[Path, list[tuple[str, torch.Tensor]]]:
    from bench_rollout import random_qwen2

    from trainer.tiny_model import build_tiny_model

    demo, out = Path(tempfile.mkdtemp(prefix="reload-demo-")), Path(tempfile.mkdtemp(prefix="reload-"))
    build_tiny_model(demo, seed=0)  # for its tokenizer and chat template
    model = random_qwen2(hidden, layers, vocab, seed=1)
    model.save_pretrained(out)
    for f in list(demo.glob("*token*")) + [demo / "chat_template.jinja"]:
        (out / f.name).write_bytes(f.read_bytes())
    # what the trainer pushes: named_parameters, the tied head once (as the embedding)
    return out, [(k, p.detach().clone()) for k, p in model.named_parameters()]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args()

    from vllm import LLM
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from rollout_server.vllm_gloo_engine import refresh_cpu_embedding_gemms

    path, state = model_dir(args.hidden, args.layers, args.vocab)
    names = {name for name, _ in state}
    nbytes = sum(t.numel() * t.element_size() for _, t in state)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512)
    model_config = llm.llm_engine.model_config

    def reload(model, loaded, profile=None) -> tuple[list[float], int]:
        t = [time.perf_counter()]
        initialize_layerwise_reload(model)
        t.append(time.perf_counter())
        if profile is not None:
            profile.enable()
        model.load_weights(state)
        if profile is not None:
            profile.disable()
        t.append(time.perf_counter())
        finalize_layerwise_reload(model, model_config)
        t.append(time.perf_counter())
        rebuilt = refresh_cpu_embedding_gemms(model, loaded)
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:], strict=False)], rebuilt

    llm.apply_model(lambda m: reload(m, names))  # warm-up
    steps = {
        "initialize": [],
        "load_weights": [],
        "finalize": [],
        "refresh, all": [],
        "refresh, stale only": [],
    }
    rebuilt = {}
    for i in range(args.repeats):
        order = [("refresh, all", None), ("refresh, stale only", names)]
        for label, loaded in order if i % 2 == 0 else order[::-1]:
            (init, load, final, refresh), n = llm.apply_model(lambda m, loaded=loaded: reload(m, loaded))[0]
            steps["initialize"].append(init)
            steps["load_weights"].append(load)
            steps["finalize"].append(final)
            steps[label].append(refresh)
            rebuilt[label] = n

    profile = cProfile.Profile()
    llm.apply_model(lambda m: reload(m, names, profile))
    stats = pstats.Stats(
        profile
    ).stats  # (file, line, function) -> (calls, primitive calls, tottime, cumtime, ...)
    repack = sum(v[2] for k, v in stats.items() if "onednn" in k[2])
    copies = sum(
        v[2] for k, v in stats.items() if k[2] == "<method 'copy_' of 'torch._C.TensorBase' objects>"
    )
    total = sum(v[2] for v in stats.values())

    dst = [t.clone() for _, t in state]
    plain = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for a, (_, b) in zip(dst, state, strict=True):
            a.copy_(b)
        plain.append(time.perf_counter() - t0)

    out = llm.generate(["hello"], __import__("vllm").SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4, "the engine no longer generates after the reloads"

    print(f"\n{len(state)} tensors, {nbytes / 1e6:.1f} MB, {args.repeats} repeats per refresh variant\n")
    print("| step | best ms | median ms |\n|---|---|---|")
    for label, v in steps.items():
        extra = f" ({rebuilt[label]} layer(s) rebuilt)" if label in rebuilt else ""
        print(f"| {label}{extra} | {ms(min(v))} | {ms(statistics.median(v))} |")
    print(f"| a plain copy of the same bytes | {ms(min(plain))} | {ms(statistics.median(plain))} |")
    print(
        f"\nOne profiled load_weights: {ms(total)} ms of own time in its functions, of which re-packing GEMM "
        f"handles (oneDNN) {ms(repack)} ms and tensor copies {ms(copies)} ms."
    )
    a, s = statistics.median(steps["refresh, all"]), statistics.median(steps["refresh, stale only"])
    print(f"Refresh, stale only / all (medians): {s / a:.2f}x")


if __name__ == "__main__":
    main()
