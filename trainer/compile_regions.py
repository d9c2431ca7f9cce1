"""Compile the element-wise parts of the policy's decoder layers with ``torch.compile`` (``model.compile_regions``).

Why: on the CPU benchmarks the update is compute-bound (matrix products at one core's peak), and what remains
besides them and attention is a long tail of small element-wise kernels: RMSNorm's power/mean/rsqrt/multiply,
the MLP's SiLU and gate product, the rotary embedding's halves, negation and concatenation. Each reads and
writes the whole activation, forward and backward. Compiled, each group becomes a few fused loops.

What is compiled, found by name so that one rule fits the HF decoder models (Qwen2, Llama/SmolLM2, ...):
- every module whose class name ends in ``MLP`` or ``RMSNorm`` (inside the layers and the final norm);
- the ``apply_rotary_pos_emb`` function of the model's modelling file.

What is not: the attention call and its key/value cache. Compiling the whole layer was tried: its cache's
state and each layer's ``layer_idx`` are guarded on, so every layer compiled separately, twice with shared
prompts (8 compilations for 4 layers, torch._dynamo's default recompile limit; a 24-layer model would fall back to
eager). The pieces above hold no per-layer constant, so all layers share one compiled graph per piece.

``dynamic=True``: prompt and completion lengths change every step; one symbolic-shape graph serves them all
(sizes 0 and 1 still get their own). The first step pays the compilation (tens of seconds on a CPU, needs a
C++ compiler there); later steps reuse it.

Not under ZeRO-3 (refused by the config): its hooks gather each module's partitioned parameters on entry,
and compiling the module would trace them.
"""

from __future__ import annotations

import logging
import sys

import torch

log = logging.getLogger(__name__)

COMPILED_SUFFIXES = ("MLP", "RMSNorm")
ROTARY_FUNCTION = "apply_rotary_pos_emb"


def compile_regions(hf_model: torch.nn.Module) -> list[str]:
    """Compile ``hf_model``'s element-wise regions in place; returns what was compiled (names, for the log).

    Raises ValueError when nothing matches: a user who asked for compilation should not silently train
    uncompiled."""
    compiled: list[str] = []
    for name, module in hf_model.named_modules():
        if type(module).__name__.endswith(COMPILED_SUFFIXES):
            module.compile(dynamic=True)
            compiled.append(name)
    # The rotary embedding is a module-level function of the modelling file, called by the attention; the
    # compiled version replaces it in that module for this process (every model of that architecture here).
    modelling = sys.modules.get(type(hf_model).__module__)
    rotary = getattr(modelling, ROTARY_FUNCTION, None)
    if callable(rotary) and not hasattr(rotary, "_torchdynamo_orig_callable"):
        setattr(modelling, ROTARY_FUNCTION, torch.compile(rotary, dynamic=True))
        compiled.append(f"{modelling.__name__}.{ROTARY_FUNCTION}")
    if not compiled:
        raise ValueError(
            f"model.compile_regions: {type(hf_model).__name__} has no module named *MLP or *RMSNorm and no "
            f"{ROTARY_FUNCTION}; turn compile_regions off for this model"
        )
    log.info(
        "model.compile_regions: compiling %d regions (%s, ...); the first step pays the compilation",
        len(compiled),
        ", ".join(compiled[:3]),
    )
    return compiled
