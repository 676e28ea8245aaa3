"""The model of configuration_mft_tiny.py: Llama's decoder under a class and a model type that
transformers does not know, so it loads only from this file (trust_remote_code)."""

from transformers import LlamaForCausalLM

from .configuration_mft_tiny import MftTinyConfig


class MftTinyForCausalLM(LlamaForCausalLM):
    config_class = MftTinyConfig
