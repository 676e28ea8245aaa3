"""Hugging Face Hub model ids and hf://datasets/ task paths (mft_core.hub), offline.

This machine cannot reach the Hub. Every test runs the real huggingface_hub client code
(`HfApi.resolve_revision`, `snapshot_download`, `hf_hub_download`) against a Hugging Face cache
built here in exactly the layout huggingface_hub writes: `<type>s--org--name/` with `blobs/`
(files named by their etag: sha256 for LFS files, the git blob sha1 for the others), `snapshots/
<commit>/` (relative symlinks into `blobs/`), `refs/<branch or tag>` (the commit, no newline) and
`trees/<commit>.json` (the tree listing huggingface_hub >= 2.4 caches).

Where a test needs the Hub's servers to answer (errors, an online download), `fake_hub` installs
an httpx2 MockTransport through huggingface_hub's own `set_client_factory`: it stands in for the
Hub's servers only; the whole client above the transport is real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http as hf_http

from mft_core import hub
from mft_core.config import config_from_dict
from mft_core.data.ingest import ingest_key_parts, read_tasks
from mft_core.hub import HubError
from mft_core.merge import merge_key_parts
from mft_core.modeling import load_tokenizer, resolve_model, resolve_tokenizer_folder, tokenizer_content_hash
from mft_core.stages import compute_key, run_stage
from mft_core.store import FileHashCache
from mft_core.train.stage import model_digest, train_key_parts

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"
DATA_COMMIT = "d" * 8 + "0123456789abcdef0123456789abcdef"
DATA_COMMIT_2 = "e" * 8 + "0123456789abcdef0123456789abcdef"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".gguf", ".pth", ".h5", ".msgpack", ".parquet")
SECRET = "hf_SentinelTokenValue0123456789abcdefXYZ"


# ----------------------------------------------------------------------------- the cache layout


def etag(path: str, data: bytes) -> str:
    """The name huggingface_hub gives a blob: the sha256 of an LFS file, else the git blob sha1."""
    if path.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(path: str, data: bytes) -> dict:
    entry = {"size": len(data), "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if path.endswith(LFS_SUFFIXES):
        entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
    return entry


def write_snapshot(cache: Path, repo_type: str, repo_id: str, commit: str, files: dict[str, bytes],
                   refs: tuple[str, ...] = ("main",), listed_only: dict[str, bytes] | None = None) -> Path:
    """One commit of a repo in the cache, as snapshot_download leaves it. `listed_only`: files of the
    commit that were not downloaded (in the tree listing, absent from the snapshot); None: no listing."""
    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for rel, data in files.items():
        blob = storage / "blobs" / etag(rel, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        set_ref(cache, repo_type, repo_id, ref, commit)
    if listed_only is not None:
        listing = {rel: tree_entry(rel, data) for rel, data in {**files, **listed_only}.items()}
        (storage / "trees").mkdir(parents=True, exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(
            json.dumps({"format_version": 1, "files": dict(sorted(listing.items()))}, indent=1))
    return snapshot


def set_ref(cache: Path, repo_type: str, repo_id: str, ref: str, commit: str) -> None:
    path = cache / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# A real model repo holds more than a causal LM needs: none of these may be downloaded.
NOT_NEEDED = {
    "pytorch_model.bin": b"pickled weights",
    "onnx/model.onnx": b"onnx graph",
    "original/consolidated.00.pth": b"original checkpoint",
    "model.Q4_K_M.gguf": b"GGUF",
    "tf_model.h5": b"tf weights",
    "flax_model.msgpack": b"flax weights",
    "README.md": b"# tiny\n",
}


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache for this test, offline (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE=1)
    and no token. huggingface_hub reads these variables once, when it is imported, into
    huggingface_hub.constants; a real run sets them before it starts, but this test process
    imported huggingface_hub already, so the constants are set to match the variables
    (test_a_fresh_process_takes_the_cache_and_offline_switch_from_the_environment checks the
    variables alone, in a new process)."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    hub.clear_cache()
    yield cache
    hub.clear_cache()


@pytest.fixture
def tiny_hub_model(hf_cache, tiny_llama_dir) -> Path:
    """org/tiny at COMMIT_A (refs main and v1): the tiny Llama's files, with a tree listing that
    also names files a causal LM does not need (not downloaded)."""
    return write_snapshot(hf_cache, "model", "org/tiny", COMMIT_A, folder_files(tiny_llama_dir),
                          refs=("main", "v1"), listed_only=NOT_NEEDED)


def go_online(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.clear_cache()


@pytest.fixture
def fake_hub(hf_cache, monkeypatch):
    """Stands in for the Hub's servers (which this machine cannot reach): `fake_hub.answer` is
    called with each httpx2 request that huggingface_hub sends and returns the response (or
    raises a transport error). Turns offline mode off."""

    class FakeHub:
        def __init__(self):
            self.requests: list[httpx2.Request] = []

        def answer(self, request: httpx2.Request) -> httpx2.Response:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)

    fake = FakeHub()

    def handler(request: httpx2.Request) -> httpx2.Response:
        fake.requests.append(request)
        return fake.answer(request)

    go_online(monkeypatch)
    hf_http.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(handler), event_hooks={"request": [hf_http.hf_request_event_hook]},
        follow_redirects=True))
    yield fake
    hf_http.set_client_factory(hf_http.default_client_factory)


def hub_error(status: int, code: str | None, message: str) -> httpx2.Response:
    headers = {"X-Error-Message": message, "X-Request-Id": "req-1"}
    if code:
        headers["X-Error-Code"] = code
    return httpx2.Response(status, headers=headers, json={"error": message})


def pipeline_cfg(base: Path, model: str, tasks: list | None = None, **top):
    raw = {"runs_root": "runs", "data": {"tasks": tasks or [{"path": "t"}]}, "model": {"path": model},
           "ingest": {"decontaminate": {"enabled": False}, "min_valid": 2}, **top}
    return config_from_dict(raw, base)


# ----------------------------------------------------------------------------- parsing


def test_model_ids_and_dataset_uris_are_parsed_strictly():
    assert hub.parse_model_id("org/tiny") == hub.HubRef("model", "org/tiny")
    assert hub.parse_model_id("org/tiny@v1.0") == hub.HubRef("model", "org/tiny", "v1.0")
    assert hub.parse_model_id(f"org/tiny@{COMMIT_A}").revision == COMMIT_A
    assert hub.parse_model_id("org/tiny@refs/pr/3").revision == "refs/pr/3"
    for not_an_id in ("tiny", "a/b/c", "./org/tiny", "/abs/tiny", "org/ti--ny", "org/tiny@", "-org/tiny", "org/tiny.gguf/x"):
        assert hub.parse_model_id(not_an_id) is None, not_an_id

    ref = hub.parse_dataset_uri("hf://datasets/codefuse-ai/CodeExercise-Python-27k@refs%2Fconvert%2Fparquet/data/x.jsonl")
    assert (ref.repo_id, ref.revision, ref.subpath) == ("codefuse-ai/CodeExercise-Python-27k", "refs/convert/parquet", "data/x.jsonl")
    assert hub.parse_dataset_uri("hf://datasets/org/set/").subpath == ""
    for bad, why in (("hf://org/model", "only Hub datasets"), ("hf://datasets/org", "names no dataset"),
                     ("hf://datasets/org/set@", "empty revision"), ("hf://datasets/org/set/../x", "'..'")):
        with pytest.raises(ValueError, match=why):
            hub.parse_dataset_uri(bad)


def test_model_files_prefer_safetensors_and_skip_other_formats():
    listing = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "additional_chat_templates/tool_use.jinja", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "model.safetensors.index.json", "consolidated.safetensors",
               "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
               "training_args.bin", "onnx/model.onnx", "onnx/model.safetensors", "original/consolidated.00.pth",
               "original/tokenizer.model", "model.Q4_K_M.gguf", "tf_model.h5", "flax_model.msgpack", "README.md",
               ".gitattributes", "modeling_chatglm.py", "tokenization_chatglm.py", "scripts/convert.py"]
    assert hub.model_files(listing) == [
        "additional_chat_templates/tool_use.jinja", "chat_template.jinja", "config.json", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "modeling_chatglm.py", "tokenization_chatglm.py",  # the model's own code (model.trust_remote_code)
        "tokenizer.json", "tokenizer_config.json"]
    only_bin = [f for f in listing if "safetensors" not in f]
    assert [f for f in hub.model_files(only_bin) if "model" in f and "config" not in f and ".py" not in f] == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]


# ----------------------------------------------------------------------------- models from the cache


def test_hub_id_resolves_offline_to_the_cached_snapshot_which_transformers_loads(tiny_hub_model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = resolve_model("org/tiny", tmp_path / "runs")
    assert folder == tiny_hub_model
    # The tree listing names pytorch_model.bin, onnx/, a .gguf ...: had they been asked for, the
    # offline snapshot_download would have failed on the missing files.
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(resolve_tokenizer_folder("org/tiny", tmp_path / "runs")).eos_token == "<|im_end|>"
    assert not (tmp_path / "runs").exists(), "a Hub snapshot is used in place, nothing is converted"


def test_branch_tag_and_commit_revisions_resolve_to_the_same_snapshot(tiny_hub_model, tmp_path):
    for reference in ("org/tiny@main", "org/tiny@v1", f"org/tiny@{COMMIT_A}"):
        assert resolve_model(reference, tmp_path) == tiny_hub_model, reference
    with pytest.raises(HubError, match="org/tiny@no-such-branch is not in the Hugging Face cache"):
        resolve_model("org/tiny@no-such-branch", tmp_path)


def test_a_snapshot_without_tree_listing_is_used_as_cached(hf_cache, tiny_llama_dir, tmp_path):
    # Caches written by huggingface_hub < 2.4 have no trees/: the snapshot is taken as it is.
    folder = write_snapshot(hf_cache, "model", "org/old", COMMIT_A, folder_files(tiny_llama_dir))
    assert resolve_model("org/old", tmp_path) == folder


def test_resolution_happens_once_per_process(tiny_hub_model, hf_cache, tiny_llama_dir, tmp_path):
    write_snapshot(hf_cache, "model", "org/tiny", COMMIT_B, folder_files(tiny_llama_dir), refs=())
    assert resolve_model("org/tiny", tmp_path).name == COMMIT_A
    set_ref(hf_cache, "model", "org/tiny", "main", COMMIT_B)  # main moves while the process runs
    assert resolve_model("org/tiny", tmp_path).name == COMMIT_A, "every stage of one run sees the same commit"
    hub.clear_cache()  # a new process
    assert resolve_model("org/tiny", tmp_path).name == COMMIT_B


def test_a_moved_branch_changes_the_model_keys_and_a_pinned_commit_does_not(tiny_hub_model, hf_cache, tiny_llama_dir, tmp_path):
    write_snapshot(hf_cache, "model", "org/tiny", COMMIT_B, folder_files(tiny_llama_dir), refs=())
    hashes = FileHashCache(tmp_path / "runs")

    def keys(model: str) -> dict:
        cfg = pipeline_cfg(tmp_path, model)
        return {"train": compute_key(cfg, "train", None), "merge": compute_key(cfg, "merge", None),
                "tokenize": compute_key(cfg, "tokenize", None), "train_inputs": train_key_parts(cfg, hashes)[1],
                "merge_inputs": merge_key_parts(cfg, hashes)[1]}

    on_main, pinned = keys("org/tiny"), keys(f"org/tiny@{COMMIT_A}")
    assert on_main["train_inputs"] == [f"model:hub:org/tiny@{COMMIT_A}"]
    assert on_main["merge_inputs"] == [f"model:hub:org/tiny@{COMMIT_A}"]
    assert on_main == pinned

    set_ref(hf_cache, "model", "org/tiny", "main", COMMIT_B)
    hub.clear_cache()  # the next run is a new process
    moved, still_pinned = keys("org/tiny"), keys(f"org/tiny@{COMMIT_A}")
    assert moved["train_inputs"] == [f"model:hub:org/tiny@{COMMIT_B}"]
    assert moved["train"] != on_main["train"] and moved["merge"] != on_main["merge"]
    assert moved["tokenize"] == on_main["tokenize"], "same tokenizer bytes: tokenize is keyed by content"
    assert still_pinned == pinned


def test_model_digest_names_the_commit_of_a_snapshot_and_hashes_a_local_folder(tiny_hub_model, tiny_llama_dir, tmp_path):
    hashes = FileHashCache(tmp_path)
    assert model_digest(tiny_hub_model, hashes) == f"hub:org/tiny@{COMMIT_A}"
    weights = hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()
    assert f"model.safetensors:{weights}" in model_digest(tiny_llama_dir, hashes)
    copy = shutil.copytree(tiny_hub_model, tmp_path / "copy" / "snapshots" / COMMIT_A)  # not in a cache (no blobs/)
    assert f"model.safetensors:{weights}" in model_digest(Path(copy), hashes)


def test_an_existing_local_folder_wins_over_a_hub_id(tiny_hub_model, tiny_llama_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    local = Path(shutil.copytree(tiny_llama_dir, project / "org" / "tiny"))
    cfg = pipeline_cfg(project, "org/tiny")
    assert cfg.model.path == str(local.resolve()), "relative to the config file"
    assert resolve_model(cfg.model.path, tmp_path) == local.resolve()
    monkeypatch.chdir(project)
    assert resolve_model("org/tiny", tmp_path) == local.resolve(), "relative to the working directory"
    assert not model_digest(local, FileHashCache(tmp_path)).startswith("hub:")


def test_offline_without_the_snapshot_the_error_names_the_id_the_cache_and_how_to_download(hf_cache, tmp_path):
    for reference, command in (("org/absent", "hf download org/absent`"),
                               (f"org/absent@{COMMIT_A}", f"hf download org/absent --revision {COMMIT_A}`")):
        with pytest.raises(HubError) as caught:
            resolve_model(reference, tmp_path)
        message = str(caught.value)
        for expected in (f"model {reference} is not in the Hugging Face cache ({hf_cache})", "HF_HUB_OFFLINE=1",
                         command, "run once with network access"):
            assert expected in message, (expected, message)
    with pytest.raises(HubError, match=r"dataset hf://datasets/org/absent-data is not in the Hugging Face cache .*"
                                       r"hf download org/absent-data --repo-type dataset"):
        hub.resolve_dataset("hf://datasets/org/absent-data")


def test_a_fresh_process_takes_the_cache_and_offline_switch_from_the_environment(tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    snapshot = write_snapshot(home / "hub", "model", "org/tiny", COMMIT_A, folder_files(tiny_llama_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")  # no HF_HUB_CACHE: $HF_HOME/hub
    code = "import sys; from mft_core.modeling import resolve_model; print(resolve_model('org/tiny', sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)
    done = subprocess.run([sys.executable, "-c", code.replace("org/tiny", "org/other"), str(tmp_path / "runs")],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"not in the Hugging Face cache ({home / 'hub'})" in done.stderr


def test_a_tokenizer_saved_offline_is_saved_as_online(tiny_hub_model, tmp_path, monkeypatch):
    # transformers writes the load's local_files_only, forced True by HF_HUB_OFFLINE=1, into a saved
    # tokenizer_config.json: the tokenize output (and the train key over it) would change offline.
    saved = {}
    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        load_tokenizer(tiny_hub_model).save_pretrained(tmp_path / str(offline))
        saved[offline] = tokenizer_content_hash(tmp_path / str(offline))
    assert saved[True] == saved[False]


# ----------------------------------------------------------------------------- the Hub's answers (fake_hub)


def test_a_gated_repo_without_access_says_to_set_hf_token(fake_hub, tmp_path):
    fake_hub.answer = lambda request: hub_error(401, "GatedRepo", "Access to model org/gated is restricted.")
    with pytest.raises(HubError) as caught:
        resolve_model("org/gated", tmp_path)
    message = str(caught.value)
    assert "model org/gated is gated" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert fake_hub.requests[0].url.path == "/api/models/org/gated"  # repo_info of the default branch


def test_a_private_or_missing_repo_error_names_the_id(fake_hub, tmp_path):
    # The Hub answers 401 RepoNotFound for a private repo without a token, 404 for a missing one.
    for status in (401, 404):
        fake_hub.answer = lambda request, status=status: hub_error(status, "RepoNotFound", "Repository not found")
        with pytest.raises(HubError) as caught:
            resolve_model("org/nope", tmp_path)
        message = str(caught.value)
        assert "model org/nope was not found on the Hugging Face Hub" in message
        assert "HF_TOKEN" in message and "hf auth login" in message
    fake_hub.answer = lambda request: hub_error(404, "RepoNotFound", "Repository not found")
    with pytest.raises(HubError, match="dataset org/nope-data was not found on the Hugging Face Hub"):
        hub.resolve_dataset("hf://datasets/org/nope-data")
    fake_hub.answer = lambda request: hub_error(404, "RevisionNotFound", "Invalid rev id: nope")
    with pytest.raises(HubError, match="model org/tiny has no revision 'nope'"):
        resolve_model("org/tiny@nope", tmp_path)


def test_an_unreachable_hub_falls_back_to_the_cache_or_says_what_is_missing(fake_hub, tiny_hub_model, tmp_path):
    # fake_hub refuses every connection, as an unreachable Hub does.
    assert resolve_model("org/tiny", tmp_path) == tiny_hub_model
    assert fake_hub.requests, "the Hub was asked first"
    with pytest.raises(HubError) as caught:
        resolve_model("org/elsewhere", tmp_path)
    message = str(caught.value)
    assert "model org/elsewhere is not in the Hugging Face cache" in message
    assert "the Hub cannot be reached (ConnectError" in message and "HF_HUB_OFFLINE" in message
    assert "hf download org/elsewhere" in message


def serving(repo_type: str, repo_id: str, commit: str, files: dict[str, bytes], fetched: list[str]):
    """The Hub endpoints that resolve_revision, repo_info and snapshot_download use, for one repo
    at one commit (its default branch); every file body served is recorded in `fetched`."""
    api = f"/api/{repo_type}s/{repo_id}"
    resolve = f"{'/datasets' if repo_type == 'dataset' else ''}/{repo_id}/resolve/{commit}/"

    def answer(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path in (api, f"{api}/revision/{commit}"):
            return httpx2.Response(200, json={"id": repo_id, "sha": commit, "siblings": [{"rfilename": f} for f in files]})
        if path == f"{api}/tree/{commit}":
            return httpx2.Response(200, json=[
                {"type": "file", "path": name, "size": len(data), "oid": tree_entry(name, data)["blob_id"],
                 **({"lfs": {"oid": tree_entry(name, data)["lfs_sha256"], "size": len(data), "pointerSize": 130}}
                    if name.endswith(LFS_SUFFIXES) else {})}
                for name, data in files.items()])
        if path.startswith(resolve):
            name = path[len(resolve):]
            data = files[name]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag(name, data)}"', "Content-Length": str(len(data))}
            if request.method == "GET":
                fetched.append(name)
                return httpx2.Response(200, headers=headers, content=data)
            return httpx2.Response(200, headers=headers)
        return hub_error(404, None, f"unexpected request {request.method} {request.url}")

    return answer


def test_online_download_fetches_only_what_a_model_needs_then_works_offline(fake_hub, hf_cache, tiny_llama_dir, tmp_path, monkeypatch):
    fetched: list[str] = []
    fake_hub.answer = serving("model", "org/tiny", COMMIT_A, {**folder_files(tiny_llama_dir), **NOT_NEEDED}, fetched)
    folder = resolve_model("org/tiny", tmp_path)
    assert folder == hf_cache / "models--org--tiny" / "snapshots" / COMMIT_A
    assert sorted(fetched) == sorted(folder_files(tiny_llama_dir)), "weights, config and tokenizer only"
    assert (hf_cache / "models--org--tiny" / "refs" / "main").read_text() == COMMIT_A
    assert folder_files(folder) == folder_files(tiny_llama_dir)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the next run, offline
    hub.clear_cache()
    requests = len(fake_hub.requests)
    assert resolve_model("org/tiny", tmp_path) == folder
    assert len(fake_hub.requests) == requests, "offline: no request at all"


def test_online_dataset_download_fetches_the_data_files_under_its_path(fake_hub, hf_cache, caplog):
    files = {"data/a.jsonl": records(4), "data/sub/b.jsonl.gz": b"gz", "data/c.parquet": b"PAR1", "data/notes.csv": b"x",
             "other/d.jsonl": records(2), "README.md": b"# set", ".gitattributes": b"*.parquet filter=lfs"}
    fetched: list[str] = []
    fake_hub.answer = serving("dataset", "org/set", DATA_COMMIT, files, fetched)
    caplog.set_level(logging.WARNING, logger="mft.hub")
    snapshot, local = hub.resolve_dataset("hf://datasets/org/set/data")
    assert sorted(fetched) == ["data/a.jsonl", "data/c.parquet", "data/sub/b.jsonl.gz"]
    assert local == hf_cache / "datasets--org--set" / "snapshots" / DATA_COMMIT / "data"
    assert "data/notes.csv" in caplog.text and "other/d.jsonl" not in caplog.text
    assert (hf_cache / "datasets--org--set" / "refs" / "main").read_text() == DATA_COMMIT


# ----------------------------------------------------------------------------- the token


def test_the_token_is_sent_to_the_hub_but_never_reaches_a_message(fake_hub, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its request log says whether a token went along
    # A server that echoes what it got, headers included, must not leak it either.
    fake_hub.answer = lambda request: hub_error(403, None, f"no access for {request.headers.get('authorization')}")
    with pytest.raises(HubError) as caught:
        resolve_model("org/private", tmp_path)
    assert fake_hub.requests[0].headers["authorization"] == f"Bearer {SECRET}", "huggingface_hub read HF_TOKEN itself"
    message = str(caught.value)
    assert "HTTP 403" in message and "HF_TOKEN" in message
    assert SECRET not in message and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert SECRET not in caplog.text


def test_the_token_reaches_no_key_config_copy_or_log(tiny_hub_model, hf_cache, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")  # its request log says whether a token went along
    write_snapshot(hf_cache, "dataset", "org/mft-data", DATA_COMMIT, {"train.jsonl": records(30)})
    cfg = pipeline_cfg(tmp_path, "org/tiny@main", tasks=[{"path": "hf://datasets/org/mft-data"}])
    hashes = FileHashCache(cfg.runs_root)
    parts = [ingest_key_parts(cfg, hashes), train_key_parts(cfg, hashes), merge_key_parts(cfg, hashes)]
    keys = [compute_key(cfg, stage, None) for stage in ("ingest", "tokenize", "train", "merge")]
    run = run_stage(cfg, "ingest")
    written = "".join(p.read_text(errors="replace") for p in run.directory.rglob("*") if p.is_file())
    everything = json.dumps([parts, keys, cfg.model_dump(mode="json")]) + written + caplog.text + "".join(capfd.readouterr())
    assert f"hub:org/tiny@{COMMIT_A}" in everything and f"hf-dataset:org/mft-data@{DATA_COMMIT}" in everything
    assert SECRET not in everything


def test_redact_removes_the_env_token_and_anything_token_shaped(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-without-prefix")
    text = hub.redact(f"a plain-secret-without-prefix b Authorization: Bearer xyz c {SECRET} d")
    assert text == "a <redacted> b Authorization: <redacted> c <redacted> d"


def test_outputs_name_a_hub_base_model_by_repo_and_commit(tiny_hub_model, tmp_path):
    from mft_core.merge import model_card

    cfg = pipeline_cfg(tmp_path, "org/tiny")
    base = cfg.display_path(resolve_model(cfg.model.path, cfg.runs_root))
    assert base == f"hf://org/tiny@{COMMIT_A}", "the merge report's base_model: no machine-specific cache path"
    assert cfg.display_path(tiny_hub_model / "config.json") == f"hf://org/tiny@{COMMIT_A}/config.json"
    check = {"reference": "x", "samples": 1, "split": "valid", "tokens": 1, "precision": "float64", "max_abs_diff": 0.0, "tolerance": 1e-4,
             "mean_abs_diff": 0.0, "argmax_agreement": 1.0, "finetune_effect": {"max_abs_diff": 1.0}}
    card = model_card(cfg, {"summary": {}, "tasks": [], "train": {}}, {"template": "chat_template", "eos_id": 2, "pad_id": 2},
                      {"method": "lora", "base_model": base, "merged": True, "dtype": "fp32", "check": check})
    assert "\nbase_model: org/tiny\n" in card.split("---")[1]


# ----------------------------------------------------------------------------- datasets


def records(count: int, tag: str = "q") -> bytes:
    return "".join(json.dumps({"chat_rounds": [{"role": "human", "content": f"{tag} {i}: write f{i}"},
                                               {"role": "bot", "content": f"def f{i}():\n    return {i}"}]}) + "\n"
                   for i in range(count)).encode()


def test_a_hub_dataset_task_path_keeps_its_uri_and_names_the_task(tmp_path):
    (tmp_path / "local").mkdir()
    cfg = pipeline_cfg(tmp_path, "org/tiny", tasks=[
        {"path": "hf://datasets/codefuse-ai/Evol-instruction-66k"},
        {"path": "hf://datasets/codefuse-ai/CodeExercise-Python-27k@v2/data/exercises.jsonl.gz"},
        {"path": "hf://datasets/org/set/python", "name": "py"},
        {"path": "local"},
    ])
    paths = [t.path for t in cfg.data.tasks]
    assert paths[:3] == ["hf://datasets/codefuse-ai/Evol-instruction-66k",
                         "hf://datasets/codefuse-ai/CodeExercise-Python-27k@v2/data/exercises.jsonl.gz",
                         "hf://datasets/org/set/python"]
    assert paths[3] == (tmp_path / "local").resolve(), "local paths are still relative to the config file"
    assert [t.task_name for t in cfg.data.tasks] == ["Evol-instruction-66k", "exercises", "py", "local"]
    assert cfg.model_dump(mode="json")["data"]["tasks"][0]["path"] == "hf://datasets/codefuse-ai/Evol-instruction-66k"


def test_a_hub_dataset_is_ingested_from_the_cache_with_its_commit_in_the_key(hf_cache, tmp_path):
    write_snapshot(hf_cache, "dataset", "org/mft-data", DATA_COMMIT,
                   {"data/train.jsonl": records(20), "data/more/extra.jsonl": records(5, "x"), "other/skip.jsonl": records(3, "s")})
    write_snapshot(hf_cache, "dataset", "org/mft-data", DATA_COMMIT_2,
                   {"data/train.jsonl": records(20), "data/more/extra.jsonl": records(5, "x"), "other/skip.jsonl": records(3, "s")},
                   refs=())
    cfg = pipeline_cfg(tmp_path, "org/tiny", tasks=[{"path": "hf://datasets/org/mft-data/data"}])
    inputs = ingest_key_parts(cfg, FileHashCache(cfg.runs_root))[1]
    assert f"hf-dataset:org/mft-data@{DATA_COMMIT}" in inputs
    assert [i.split(":")[0] for i in inputs if i.startswith("data/")] == ["data/more/extra.jsonl", "data/train.jsonl"]

    run = run_stage(cfg, "ingest")
    [task] = read_tasks(run.directory)
    assert (task["name"], task["path"], task["train"] + task["valid"]) == ("data", "hf://datasets/org/mft-data/data", 25)
    # Outputs name the pinned files, not where this machine keeps its cache.
    assert task["files"] == [f"hf://datasets/org/mft-data@{DATA_COMMIT}/data/more/extra.jsonl",
                             f"hf://datasets/org/mft-data@{DATA_COMMIT}/data/train.jsonl"]
    assert str(hf_cache) not in (run.directory / "tasks.json").read_text()

    key = compute_key(cfg, "ingest", None)
    assert key.startswith(run.directory.name)
    set_ref(hf_cache, "dataset", "org/mft-data", "main", DATA_COMMIT_2)  # same bytes, new commit
    hub.clear_cache()
    assert compute_key(cfg, "ingest", None) != key
    pinned = pipeline_cfg(tmp_path, "org/tiny", tasks=[{"path": f"hf://datasets/org/mft-data@{DATA_COMMIT}/data", "name": "data"}])
    assert compute_key(pinned, "ingest", None) == key, "the same files at the same commit"


def test_a_hub_dataset_downloads_only_data_files_under_its_path_and_lists_the_others(hf_cache, tmp_path, caplog):
    files = {"python/a.jsonl": records(6), "python/b.jsonl.gz": records(6, "gz")}
    write_snapshot(hf_cache, "dataset", "org/set", DATA_COMMIT, files,
                   listed_only={"python/notes.csv": b"a,b\n", "python/README.md": b"#\n", "java/c.jsonl": records(4)})
    caplog.set_level(logging.WARNING, logger="mft.hub")
    snapshot, local = hub.resolve_dataset("hf://datasets/org/set/python")
    assert (snapshot.repo_id, snapshot.commit, local) == ("org/set", DATA_COMMIT, snapshot.folder / "python")
    assert "1 file(s) not downloaded" in caplog.text and "python/notes.csv" in caplog.text
    assert "java/c.jsonl" not in caplog.text and "README.md" not in caplog.text
    # One file: just that file is asked for (java/c.jsonl and the .csv are not cached: asking would fail offline).
    assert hub.resolve_dataset("hf://datasets/org/set@main/python/a.jsonl")[1] == snapshot.folder / "python" / "a.jsonl"
    with pytest.raises(HubError, match="no file or folder 'ruby'"):
        hub.resolve_dataset("hf://datasets/org/set/ruby")
    with pytest.raises(HubError, match=r"no \*\.jsonl, \*\.jsonl\.gz, \*\.parquet file .*python/notes\.csv"):
        hub.resolve_dataset("hf://datasets/org/set/python/notes.csv")
