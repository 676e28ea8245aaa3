"""Hugging Face Hub references, downloaded once into the standard Hugging Face cache.

Two kinds of reference:
  * a model id ``org/name`` or ``org/name@revision`` (``model.path``): the files a causal LM
    needs (config, weights, tokenizer, generation config, chat templates) are downloaded;
  * a dataset URI ``hf://datasets/org/name[@revision][/path/in/repo]`` (``data.tasks[].path``):
    the ``*.jsonl``, ``*.jsonl.gz`` and ``*.parquet`` files under that path are downloaded.

A revision is a branch, a tag or a commit hash (default: the repo's default branch ``main``);
in a dataset URI a revision holding ``/`` is written URL-encoded (``@refs%2Fpr%2F1``), as in
huggingface_hub's own ``hf://`` paths.

Everything goes through ``huggingface_hub`` (``HfApi.resolve_revision``, then
``snapshot_download``) into its cache, so its environment variables apply unchanged: HF_HOME /
HF_HUB_CACHE (where), HF_TOKEN or ``hf auth login`` (private and gated repos), HF_HUB_OFFLINE=1
(no network: the revision is looked up in the cache's ``refs/``). This module never reads, passes
or stores a token; the messages of the errors it raises are built here from the error's type, HTTP
status and the server's message, never from a request, and any token is redacted from them.

Each reference is resolved once per process (the result is cached), because every stage's key
computation resolves the model again. The commit a reference resolved to names the snapshot
folder (``.../models--org--name/snapshots/<commit>/``), which ``snapshot_of`` reads back: stage
keys use ``repo@commit`` instead of hashing the weights (the cache's blobs are content-addressed
and the commit pins them), so a moved branch changes the keys and a pinned commit never does.

huggingface_hub is imported inside the functions that need it, so importing this module (from
the config schema) stays cheap.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

log = logging.getLogger("mft.hub")

DATASET_URI_PREFIX = "hf://datasets/"
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")

# One part of a repo id, as the Hub allows it: letters, digits, '-', '_', '.', not starting or
# ending with '-' or '.', no '--' or '..' (huggingface_hub's validate_repo_id), at most 96 chars.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_MODEL_ID = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[^\s@]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{30,}|(?i:bearer)\s+\S+")

# Files that define a tokenizer's behaviour (and, for chat_template rendering, its template).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# Files of a model repo that transformers reads besides the weights (top level only).
MODEL_METADATA_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
CHAT_TEMPLATES_FOLDER = "additional_chat_templates/"
# Weights transformers loads, in order of preference: safetensors, else PyTorch pickles. Only
# these names: a repo's other copies (original/, onnx/, *.gguf, tf_model.h5, flax_model.msgpack,
# consolidated.safetensors, ...) are never downloaded.
_SAFETENSORS = re.compile(r"model(?:-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")
_PYTORCH_BIN = re.compile(r"pytorch_model(?:-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json")
# When the repo's file list is unknown (offline, and huggingface_hub cached no tree listing for
# the commit), these patterns filter nothing that matters: the cache returns the snapshot as is.
_MODEL_FALLBACK_PATTERNS = (
    *MODEL_METADATA_FILES,
    CHAT_TEMPLATES_FOLDER + "*",
    "*.py",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)
# Never worth a warning when a dataset's other files are listed.
_DATASET_NOISE = (".gitattributes", "README.md")


class HubError(RuntimeError):
    """A Hub reference that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class HubRef:
    """A parsed reference: ``repo_type`` is "model" or "dataset"; ``revision`` None means the
    default branch; ``subpath`` (datasets only) is a file or folder inside the repo, "" for all."""

    repo_type: str
    repo_id: str
    revision: str | None = None
    subpath: str = ""

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        if self.repo_type == "dataset":
            subpath = f"/{self.subpath}" if self.subpath else ""
            return f"{DATASET_URI_PREFIX}{self.repo_id}{revision}{subpath}"
        return f"{self.repo_id}{revision}"


@dataclass(frozen=True)
class Snapshot:
    """A downloaded revision: the cache's ``snapshots/<commit>`` folder of a repo."""

    repo_type: str
    repo_id: str
    commit: str
    folder: Path

    @property
    def pinned(self) -> str:
        """``repo@commit``: what a stage key records for this snapshot."""
        return f"{self.repo_id}@{self.commit}"

    def uri(self, relative: str = "") -> str:
        """The ``hf://`` URI of a path inside the snapshot, pinned to the commit."""
        prefix = DATASET_URI_PREFIX if self.repo_type == "dataset" else "hf://"
        return f"{prefix}{self.pinned}" + (f"/{relative}" if relative else "")


# ----------------------------------------------------------------------------- parsing


def parse_model_id(text: str) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a model reference, or None when ``text`` does not
    have that shape (the caller checks local paths first: an existing folder always wins)."""
    match = _MODEL_ID.fullmatch(text.strip())
    if match is None or not _valid_repo_id(match["repo"]):
        return None
    return HubRef("model", match["repo"], match["revision"])


def is_dataset_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith("hf://")


def parse_dataset_uri(uri: str) -> HubRef:
    """``hf://datasets/org/name[@revision][/path]`` -> HubRef; ValueError saying what is wrong."""
    example = f"{DATASET_URI_PREFIX}ORG/NAME[@REVISION][/PATH/IN/REPO]"
    if not uri.startswith(DATASET_URI_PREFIX):
        raise ValueError(f"{uri!r}: only Hub datasets can be task paths, written {example}")
    parts = uri[len(DATASET_URI_PREFIX):].rstrip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{uri!r} names no dataset: write {example}")
    name, _, revision = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    if not _valid_repo_id(repo_id):
        raise ValueError(f"{uri!r}: {repo_id!r} is not a valid Hub repo id (org/name: letters, digits, '-', '_', '.')")
    if "@" in parts[1] and not revision:
        raise ValueError(f"{uri!r}: empty revision after '@'")
    subpath = parts[2:]
    if any(part in ("", ".", "..") for part in subpath):
        raise ValueError(f"{uri!r}: the path inside the repo must not hold empty, '.' or '..' parts")
    return HubRef("dataset", repo_id, unquote(revision) if revision else None, "/".join(subpath))


def _valid_repo_id(repo_id: str) -> bool:
    return all(re.fullmatch(_REPO_PART, part) for part in repo_id.split("/")) and "--" not in repo_id and ".." not in repo_id


# ----------------------------------------------------------------------------- resolution

_RESOLVED: dict[tuple, tuple[Snapshot, Path]] = {}
_LOCK = threading.Lock()


def resolve_model(model_id: str) -> Snapshot:
    """Download (once) the files of a model repo that a causal LM needs; the snapshot folder."""
    ref = parse_model_id(model_id)
    if ref is None:
        raise HubError(f"{model_id!r} is not a Hub model id: write ORG/NAME or ORG/NAME@REVISION")
    snapshot, folder = _resolve_once(ref, _model_patterns)
    if not (folder / "config.json").is_file():
        raise HubError(
            f"the snapshot of {ref} (commit {snapshot.commit}) in {folder} has no config.json: it is not a "
            f"transformers model, or the cache holds only part of it; download it again with network access "
            f"(`{download_command(ref)}`)"
        )
    return snapshot


def resolve_dataset(uri: str) -> tuple[Snapshot, Path]:
    """Download (once) the data files under a ``hf://datasets/...`` URI; (snapshot, local file or
    folder inside it that the URI names)."""
    try:
        ref = parse_dataset_uri(uri)
    except ValueError as err:
        raise HubError(str(err)) from None
    snapshot, local = _resolve_once(ref, lambda files, commit: _dataset_patterns(ref, files, commit))
    if not local.exists():
        raise HubError(
            f"{uri}: no data file ({', '.join('*' + s for s in DATA_SUFFIXES)}) was downloaded from "
            f"{ref.subpath or 'the repo'} at commit {snapshot.commit} (snapshot {snapshot.folder}); check the "
            "path inside the repo"
        )
    return snapshot, local


def clear_cache() -> None:
    """Forget this process's resolutions: the next call asks the Hub (or the cache) again."""
    with _LOCK:
        _RESOLVED.clear()


def snapshot_of(path: Path | str) -> tuple[Snapshot, str] | None:
    """(snapshot, path inside it) when ``path`` lies in a Hugging Face cache snapshot folder
    (``<cache>/<type>s--org--name/snapshots/<commit>/...``, beside the cache's ``blobs/``), else
    None. Symlinks are not followed: the snapshot's files are links into ``blobs/``."""
    parts = Path(os.path.abspath(path)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] != "snapshots" or not _COMMIT.fullmatch(parts[i + 1]):
            continue
        repo_type, sep, rest = parts[i - 1].partition("--")
        pieces = rest.split("--")
        if not sep or repo_type not in ("models", "datasets", "spaces") or len(pieces) != 2:
            continue
        storage = Path(*parts[:i])
        if not (storage / "blobs").is_dir():
            continue
        snapshot = Snapshot(repo_type[:-1], "/".join(pieces), parts[i + 1], Path(*parts[: i + 2]))
        return snapshot, "/".join(parts[i + 2 :])
    return None


def download_command(ref: HubRef) -> str:
    command = f"hf download {ref.repo_id}"
    if ref.repo_type == "dataset":
        command += " --repo-type dataset"
    if ref.revision:
        command += f" --revision {ref.revision}"
    return command


def _resolve_once(ref: HubRef, choose: Callable[[list[str] | None, str], list[str]]) -> tuple[Snapshot, Path]:
    from huggingface_hub import constants

    # The cache folder and offline switch are part of the key: they decide what a resolution finds.
    key = (ref, constants.HF_HUB_CACHE, constants.is_offline_mode())
    with _LOCK:
        if key not in _RESOLVED:
            _RESOLVED[key] = _download(ref, choose)
        return _RESOLVED[key]


def _download(ref: HubRef, choose: Callable[[list[str] | None, str], list[str]]) -> tuple[Snapshot, Path]:
    import huggingface_hub
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    try:
        # Resolve the revision once (refs/<branch> is written to the cache for offline runs), then
        # download that commit: the file choice and the download see the same revision.
        revision = api.resolve_revision(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision,
                                        local_files_only=huggingface_hub.constants.is_offline_mode())
        commit = revision.resolved
        patterns = choose(_repo_files(api, ref, commit), commit)
        folder = Path(
            snapshot_download(ref.repo_id, repo_type=ref.repo_type, revision=revision, allow_patterns=patterns)
        )
    except HubError:
        raise
    except Exception as err:
        explained = _explain(err, ref, huggingface_hub.constants.HF_HUB_CACHE)
        if explained is None:
            raise
        raise explained from None  # the original may quote a request; its type and status are in the message
    snapshot = Snapshot(ref.repo_type, ref.repo_id, folder.name, folder)
    log.info("%s: commit %s, snapshot %s", ref, snapshot.commit, folder)
    return snapshot, folder / ref.subpath if ref.subpath else folder


def _repo_files(api, ref: HubRef, commit: str) -> list[str] | None:
    """The repo's files at ``commit``: huggingface_hub's cached tree listing, else the Hub's answer;
    None when neither is available (offline, or the Hub cannot be reached)."""
    import httpx2
    from huggingface_hub import constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError

    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, repo_type=ref.repo_type, revision=commit)]
    except CachedRepoTreeNotFoundError:
        pass
    if constants.is_offline_mode():
        return None
    try:
        info = api.repo_info(ref.repo_id, repo_type=ref.repo_type, revision=commit)
    except (httpx2.TransportError, OSError) as err:  # unreachable or down: snapshot_download falls back to the cache
        if isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code < 500:
            raise
        return None
    return [s.rfilename for s in info.siblings or []]


def _model_patterns(files: list[str] | None, commit: str) -> list[str]:
    if files is None:
        return list(_MODEL_FALLBACK_PATTERNS)
    chosen = model_files(files)
    if "config.json" not in chosen:
        raise HubError(
            f"the model repo at commit {commit} has no config.json, so it is not a transformers model "
            f"(files: {_sample(files)}); for a GGUF repo, download the .gguf file and pass its path"
        )
    if not any(_SAFETENSORS.fullmatch(f) or _PYTORCH_BIN.fullmatch(f) for f in chosen):
        raise HubError(
            f"the model repo at commit {commit} has no transformers weights (model*.safetensors or "
            f"pytorch_model*.bin at the top level; files: {_sample(files)})"
        )
    return [glob.escape(f) for f in chosen]


def model_files(files: list[str]) -> list[str]:
    """The files of a model repo to download: config, tokenizer, generation config and chat
    templates, the model's own code (top-level *.py: what a config's auto_map names, run only
    with model.trust_remote_code), and the weights: safetensors when there are any, else PyTorch
    .bin, never both."""
    metadata = [f for f in files if f in MODEL_METADATA_FILES or f.startswith(CHAT_TEMPLATES_FOLDER)
                or ("/" not in f and f.endswith(".py"))]
    weights = [f for f in files if _SAFETENSORS.fullmatch(f)] or [f for f in files if _PYTORCH_BIN.fullmatch(f)]
    return sorted(metadata + weights)


def _dataset_patterns(ref: HubRef, files: list[str] | None, commit: str) -> list[str]:
    sub = ref.subpath
    if sub.endswith(DATA_SUFFIXES):
        patterns = [glob.escape(sub)]
    else:
        prefix = glob.escape(sub) + "/" if sub else ""
        patterns = [f"{prefix}*{suffix}" for suffix in DATA_SUFFIXES]
    if files is None:
        return patterns
    inside = [f for f in files if not sub or f == sub or f.startswith(sub + "/")]
    if not inside:
        raise HubError(f"{ref}: the dataset has no file or folder {sub!r} at commit {commit} (files: {_sample(files)})")
    data = [f for f in inside if f.endswith(DATA_SUFFIXES)]
    if not data:
        raise HubError(
            f"{ref}: no {', '.join('*' + s for s in DATA_SUFFIXES)} file at commit {commit} "
            f"(files there: {_sample(inside)}); only those formats are read"
        )
    other = [f for f in inside if not f.endswith(DATA_SUFFIXES) and f.rsplit("/", 1)[-1] not in _DATASET_NOISE]
    if other:
        log.warning("%s: %d file(s) not downloaded, only %s files are read: %s",
                    ref, len(other), "/".join(DATA_SUFFIXES), _sample(other))
    return patterns


def _sample(files: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(files)[:limit])
    return shown + (f", ... ({len(files) - limit} more)" if len(files) > limit else "") if files else "none"


# ----------------------------------------------------------------------------- errors


def _explain(err: Exception, ref: HubRef, cache_dir: str) -> HubError | None:
    """A HubError for the errors huggingface_hub raises, or None for anything else."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    kind = "dataset" if ref.repo_type == "dataset" else "model"
    login = "set HF_TOKEN (a token with read access) or run `hf auth login`"
    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        message = (f"{kind} {ref} is gated: accept its conditions on https://huggingface.co/"
                   f"{'datasets/' if kind == 'dataset' else ''}{ref.repo_id} with your account, then {login}")
    elif isinstance(err, RepositoryNotFoundError):
        message = (f"{kind} {ref.repo_id} was not found on the Hugging Face Hub: check the id. If it is private or "
                   f"gated, {login}")
    elif isinstance(err, RevisionNotFoundError):
        message = f"{kind} {ref.repo_id} has no revision {ref.revision!r} (a branch, tag or commit hash)"
    elif isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code in (401, 403):
        message = f"{kind} {ref} refused access (HTTP {err.response.status_code}): {login}"
    elif isinstance(err, (RevisionResolutionError, LocalEntryNotFoundError)):
        cause = err.__cause__
        offline = isinstance(cause, OfflineModeIsEnabled) or (cause is None and _offline())
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline
               else f"the Hub cannot be reached ({_describe(cause)})")
        partly = "only partly " if isinstance(err, IncompleteSnapshotError) else ""
        message = (f"{kind} {ref} is {partly}not in the Hugging Face cache ({cache_dir}) and {why}. Download it "
                   f"once with network access, `{download_command(ref)}` (HF_HOME / HF_HUB_CACHE choose the cache), "
                   f"or run once with network access (HF_HUB_OFFLINE unset; set to 1 it makes runs use the cache only)")
    elif isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else "?"
        message = f"the Hugging Face Hub answered HTTP {status} for {kind} {ref}: {err.server_message or 'no details'}"
    elif isinstance(err, (httpx2.TransportError, OfflineModeIsEnabled)):
        message = f"cannot reach the Hugging Face Hub for {kind} {ref}: {_describe(err)}"
    else:
        return None
    return HubError(redact(message))


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _describe(err: BaseException | None) -> str:
    if err is None:
        return "no details"
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return f"HTTP {err.response.status_code} {err.server_message or ''}".strip()
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def redact(text: str) -> str:
    """``text`` without the token of HF_TOKEN or anything shaped like a token or bearer header."""
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "<redacted>")
    return _TOKEN_LIKE.sub("<redacted>", text)
