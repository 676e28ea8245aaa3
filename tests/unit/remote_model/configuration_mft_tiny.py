"""The configuration of a tiny causal LM that ships its own code (config.json's auto_map names this
file), for the test of model.trust_remote_code (tests/unit/test_remote_code.py). It stands for the
remote-code families (ChatGLM2/3, CodeGeeX2, Baichuan2, Qwen v1) only in how it is loaded: through
Python files in the model folder, which transformers runs only when allowed to."""

from transformers import LlamaConfig


class MftTinyConfig(LlamaConfig):
    model_type = "mft_tiny"
