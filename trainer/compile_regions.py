"""Compile the element-wise parts of the policy's decoder layers with ``torch.compile`` (``model.compile_regions``).

Why: on the CPU benchmarks the update is compute-bound (matrix products at one core's peak), and what remains
besides them and attention is a long tail of small element-wise kernels: RMSNorm's power/mean/rsqrt/multiply,
the MLP's SiLU and gate product, the rotary embedding's halves, negation and concatenation. Each reads and
writes the whole activation, forward and backward. Compiled, each group becomes a few fused loops.

What is compiled, found by name so that one rule fits the HF decoder models (Qwen2, Llama/SmolLM2, ...):
- the ``forward`` of every module whose class name ends in ``MLP`` or ``RMSNorm`` (in the layers and the final
  norm). ``forward``, not the module (``Module.compile``): a compiled module wraps ``Module._call_impl``, one
  code object for every module class, so MLPs and norms would share torch._dynamo's limit of 8 compiled
  variants per code object; a class's own ``forward`` has its own;
- the ``apply_rotary_pos_emb`` function of the model's modelling file. The attention looks that name up in
  its module's globals at each call, so the compiled function replaces it there: for the whole process, i.e.
  also for a reference model (``objective.beta > 0``) of the same architecture.

What is not: the attention call and its key/value cache. Compiling whole layers was tried: the cache's state
and each layer's ``layer_idx`` are guarded on, so every layer compiled separately, twice with shared prompts
(8 compilations for 4 layers, the default limit; a 24-layer model would fall back to eager). The pieces above
hold no per-layer constant, so all layers share one compiled graph per piece.

``dynamic=True``: prompt and completion lengths change every step; one symbolic-shape graph serves them all
(a size of 1, e.g. one distinct prompt, and no-grad passes still get their own). The first step pays the
compilation (seconds to tens of seconds on a CPU, needs a C++ compiler there); later steps reuse it.

Not under ZeRO-3 (refused by the config): its hooks gather each module's partitioned parameters around the
module's call, and the compiled forward would run on parameters it cannot see being gathered.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILED_SUFFIXES = ("MLP", "RMSNorm")
ROTARY_FUNCTION = "apply_rotary_pos_emb"


@dataclass
class CompiledRegions:
    """What ``compile_regions`` replaced, with the eager originals: ``enable(False)`` puts them back (the
    update benchmark alternates the two on one engine)."""

    modules: list[tuple[torch.nn.Module, Any, Any]] = field(default_factory=list)  # (module, eager, compiled)
    rotary: tuple[ModuleType, Any, Any] | None = None  # (modelling file, eager, compiled)

    def names(self) -> list[str]:
        out = sorted({type(m).__name__ for m, _, _ in self.modules})
        return out + ([f"{self.rotary[0].__name__}.{ROTARY_FUNCTION}"] if self.rotary else [])

    def enable(self, on: bool) -> None:
        for module, eager, compiled in self.modules:
            module.forward = compiled if on else eager
        if self.rotary:
            modelling, eager, compiled = self.rotary
            setattr(modelling, ROTARY_FUNCTION, compiled if on else eager)


def is_compiled(fn: Any) -> bool:
    return hasattr(fn, "_torchdynamo_orig_callable")


def compile_regions(hf_model: torch.nn.Module) -> CompiledRegions:
    """Compile ``hf_model``'s element-wise regions in place.

    Raises ValueError when nothing matches: a user who asked for compilation must not silently train eager."""
    regions = CompiledRegions()
    for module in hf_model.modules():
        if type(module).__name__.endswith(COMPILED_SUFFIXES):
            eager = module.forward
            regions.modules.append((module, eager, torch.compile(eager, dynamic=True)))
    modelling = sys.modules.get(type(hf_model).__module__)
    rotary = getattr(modelling, ROTARY_FUNCTION, None)
    if callable(rotary):
        # A second engine in the same process finds the function already compiled: keep that one.
        compiled = rotary if is_compiled(rotary) else torch.compile(rotary, dynamic=True)
        eager = getattr(rotary, "_torchdynamo_orig_callable", rotary)
        regions.rotary = (modelling, eager, compiled)
    if not regions.modules and not regions.rotary:
        raise ValueError(
            f"model.compile_regions: {type(hf_model).__name__} has no module named *MLP or *RMSNorm and no "
            f"{ROTARY_FUNCTION}; turn compile_regions off for this model"
        )
    regions.enable(True)
    log.info(
        "model.compile_regions: compiling %s (%d modules); the first step pays the compilation",
        ", ".join(regions.names()),
        len(regions.modules),
    )
    return regions
