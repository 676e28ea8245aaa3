"""model.trust_remote_code: a model that ships its own Python code (auto_map), as ChatGLM2/3,
CodeGeeX2, Baichuan2 and Qwen v1 do, is refused by default with a message naming the key, and with
the key on it goes through every stage that loads it: tokenize, train (LoRA and full), merge (the
merge check included) and the generation of evaluate. The model is tests/unit/remote_model/, a
tiny Llama under a class and model type transformers does not know: it proves the switch, not
those families."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mft_core.config import TrainConfig, load_config
from mft_core.eval.generate import load_generation_model
from mft_core.stages import run_stage
from mft_core.train.model import TokenLossModel, load_model
from tests.unit.train.test_model_families import packed_batch

CODE = Path(__file__).with_name("remote_model")


@pytest.fixture(scope="module")
def remote_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A model folder whose config.json names its own configuration and modeling files."""
    folder = tmp_path_factory.mktemp("mft_tiny")
    for source in CODE.glob("*_mft_tiny.py"):
        shutil.copy(source, folder / source.name)
    config = {
        "model_type": "mft_tiny", "architectures": ["MftTinyForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mft_tiny.MftTinyConfig",
                     "AutoModelForCausalLM": "modeling_mft_tiny.MftTinyForCausalLM"},
        "vocab_size": len(tiny_tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "bos_token_id": tiny_tokenizer.bos_token_id,
        "eos_token_id": tiny_tokenizer.eos_token_id, "pad_token_id": tiny_tokenizer.eos_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True),
                                             trust_remote_code=True)
    assert type(model).__name__ == "MftTinyForCausalLM"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_model_of_its_own_code_is_refused_by_default_with_the_key_named(remote_model_dir):
    with pytest.raises(ValueError, match=r"runs its own Python code .* set model\.trust_remote_code: true"):
        load_model(remote_model_dir, TrainConfig(), "fp32", "sdpa_varlen", on_gpu=False)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_with_the_switch_it_trains_with_packed_samples_isolated(remote_model_dir, method):
    wrapper = TokenLossModel(load_model(remote_model_dir, TrainConfig(method=method, lora={"dropout": 0.0}), "fp32",
                                        "sdpa_varlen", on_gpu=False, trust_remote_code=True))
    causal_lm = wrapper.model.get_base_model() if method == "lora" else wrapper.model
    assert type(causal_lm).__name__ == "MftTinyForCausalLM"
    samples, input_ids, position_ids, labels = packed_batch()
    with torch.no_grad():
        packed = wrapper(input_ids, position_ids, labels).token_loss
        alone = torch.cat([wrapper(torch.tensor([s["input_ids"]]), torch.arange(len(s["input_ids"]))[None],
                                   torch.where(torch.tensor([s["loss_mask"]]) == 1, torch.tensor([s["input_ids"]]), -100)
                                   ).token_loss for s in samples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    wrapper.train()
    wrapper(input_ids, position_ids, labels).token_loss.mean().backward()
    trainable = [p for p in wrapper.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def write_project(root: Path, model_dir: Path, trust: bool) -> Path:
    (root / "alpha").mkdir(parents=True, exist_ok=True)
    with open(root / "alpha" / "d.jsonl", "w") as fh:
        for i in range(24):
            fh.write(json.dumps({"prompt": f"question {i}: " + "word " * (i % 5), "answer": f"def f{i}(x):\n    return x * {i}"}) + "\n")
    config = {
        "data": {"tasks": [{"path": "alpha"}]},
        "model": {"path": str(model_dir), "trust_remote_code": trust},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 4},
        "tokenize": {"seq_length": 96, "num_workers": 1},
        "train": {"max_steps": 2, "grad_accum": 1, "warmup_steps": 0, "lr": 5e-3, "min_lr": 1e-4, "eval_every": 2,
                  "checkpoint_every": 100, "precision": "fp32", "threads": 1, "lora": {"dropout": 0.0}},
    }
    (root / "pipeline.yaml").write_text(json.dumps(config))
    return root / "pipeline.yaml"


def test_the_stages_load_it_with_the_switch_and_refuse_it_without(remote_model_dir, tmp_path):
    refused = load_config(write_project(tmp_path / "off", remote_model_dir, trust=False))
    run_stage(refused, "ingest")
    run_stage(refused, "tokenize")  # the tokenizer is an ordinary one: only the model is the model's own code
    with pytest.raises(Exception, match=r"model\.trust_remote_code: true"):
        run_stage(refused, "train")

    cfg = load_config(write_project(tmp_path / "on", remote_model_dir, trust=True))
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    merge_dir = run_stage(cfg, "merge").directory
    check = json.loads((merge_dir / "merge_report.json").read_text())["check"]
    assert check["passed"] and check["finetune_effect"]["max_abs_diff"] > 100 * check["max_abs_diff"]
    merged = merge_dir / "model"
    assert (merged / "modeling_mft_tiny.py").is_file()  # the merged model keeps its code
    with pytest.raises(ValueError, match=r"model\.trust_remote_code: true"):
        load_generation_model(merged, "fp32")
    generator = load_generation_model(merged, "fp32", trust_remote_code=True)
    assert type(generator.model).__name__ == "MftTinyForCausalLM"
