"""The merge stage for real: adapters trained by the real train stage on the tiny random Llama,
merged, saved, reloaded and compared logit for logit with base + adapter.

Training runs cost 10-20 s each; the LoRA and the full fine-tune are trained once per module and
shared by the tests below. The ZeRO-3 run is marked slow.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mft_core import merge
from mft_core.train.stage import job_path
from mft_core.config import load_config
from mft_core.data.render import make_template, render_prompt
from mft_core.data.tokenize import open_shard
from mft_core.merge import (BF16_TOLERANCE, FP32_TOLERANCE, MergeCheckFailed, check_sample_ids, compare_logits,
                            logits_of, run_merge)
from mft_core.stages import compute_key, locate_stage, run_stage
from mft_core.train.data import TokenizedSplit


def make_project(root: Path, model_dir: Path, merge: dict | None = None, **train) -> Path:
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True, exist_ok=True)
        with open(root / name / "d.jsonl", "w") as fh:
            for i in range(30):
                question = f"{name} question {i}: " + "more words " * (i % 5)
                answer = f"def f{i}(x):\n    return x * {i}"
                fh.write(json.dumps({"chat_rounds": [{"role": "human", "content": question},
                                                     {"role": "bot", "content": answer}]}) + "\n")
    settings = {"max_steps": 2, "grad_accum": 2, "warmup_steps": 0, "lr": 5e-3, "min_lr": 1e-4, "eval_every": 2,
                "checkpoint_every": 100, "precision": "fp32", "threads": 1, "lora": {"dropout": 0.0}, **train}
    config = {
        "data": {"tasks": [{"path": "alpha"}, {"path": "beta", "weight": 2.0}]},
        "model": {"path": str(model_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 4},
        "tokenize": {"seq_length": 96, "num_workers": 1},
        "train": settings,
        "merge": merge or {},
    }
    (root / "pipeline.yaml").write_text(json.dumps(config))
    return root / "pipeline.yaml"


def train_and_merge(path: Path) -> SimpleNamespace:
    cfg = load_config(path)
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    merged = run_stage(cfg, "merge").directory
    return SimpleNamespace(cfg=cfg, train_dir=locate_stage(cfg, "train"), merge_dir=merged,
                           report=json.loads((merged / "merge_report.json").read_text()))


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("merge_lora")
    return train_and_merge(make_project(root, tiny_llama_dir, merge={"max_shard_size": "200KB"}))


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("merge_full")
    return train_and_merge(make_project(root, tiny_llama_dir, method="full", lr=1e-3))


def valid_samples(run, count=6) -> list[list[int]]:
    tokenize_dir = job_path(json.loads((run.train_dir / "hyperparameters.json").read_text())["tokenize_dir"], run.train_dir)
    return check_sample_ids(tokenize_dir, count)[1]


def template_of(run) -> dict:
    tokenize_dir = job_path(json.loads((run.train_dir / "hyperparameters.json").read_text())["tokenize_dir"], run.train_dir)
    return json.loads((tokenize_dir / "template.json").read_text())


# ----------------------------------------------------------------------------- LoRA


def test_merged_logits_equal_base_plus_adapter(lora, tiny_llama_dir):
    merged = AutoModelForCausalLM.from_pretrained(lora.merge_dir / "model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                        lora.train_dir / "model").eval()
    samples = valid_samples(lora)
    with torch.no_grad():
        for ids in samples:
            ids = torch.tensor([ids])
            torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=FP32_TOLERANCE, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    moved = compare_logits(logits_of(adapted), logits_of(base), samples)
    assert moved["max_abs_diff"] > 0.05  # the adapter moved the logits: the equality above means something

    check = lora.report["check"]
    assert lora.report["method"] == "lora" and lora.report["merged"] and check["passed"]
    assert check["max_abs_diff"] <= FP32_TOLERANCE == check["tolerance"] and check["argmax_agreement"] == 1.0
    assert check["finetune_effect"]["max_abs_diff"] > 0.05 and check["split"] == "valid"
    assert check["samples"] == 8  # merge.check_samples default; the valid split holds 8 (4 per task)


def test_merged_weights_are_base_plus_scaled_BA_rounded_once(lora, tiny_llama_dir):
    """An independent recomputation from the files: every adapted weight on disk is exactly
    fp32(W + alpha/r * B @ A) computed in float64, every other tensor is the base's, bit for bit."""
    adapter_dir = lora.train_dir / "model"
    settings = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = settings["lora_alpha"] / settings["r"]
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    merged = {k: v for shard in (lora.merge_dir / "model").glob("*.safetensors") for k, v in load_file(shard).items()}
    assert set(merged) == set(base)
    adapted = 0
    for name, weight in base.items():
        a_key = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        if a_key in adapter:
            delta = adapter[a_key.replace("lora_A", "lora_B")].double() @ adapter[a_key].double() * scaling
            assert torch.equal(merged[name], (weight.double() + delta).float()), name
            adapted += 1
        else:
            assert torch.equal(merged[name], weight), name
    assert adapted == 7 * LlamaForCausalLM.from_pretrained(tiny_llama_dir).config.num_hidden_layers  # all-linear


def test_the_check_forward_is_float64_from_embedding_to_logits(lora, tiny_llama_dir):
    """Model code upcasts to float32 (RMSNorm, rotary angles): under the check those casts stay
    float64, so no fp32 rounding (machine-dependent) enters the comparison."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    ids = torch.tensor([valid_samples(lora, 1)[0]])

    class OutputDtypes(TorchFunctionMode):  # every torch call's floating-point results
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in out if isinstance(out, tuple) else (out,):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.seen.add(value.dtype)
            return out

    with torch.no_grad(), OutputDtypes() as plain:
        model(ids)
    assert torch.float32 in plain.seen  # the islands are real: a plain float64 forward has fp32 steps
    with OutputDtypes() as checked:  # logits_of enters float64_compute() inside the recorder
        logits_of(model)(ids)
    assert checked.seen == {torch.float64}
    # The float64 merge equals the unmerged forward to float64 rounding.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double(),
                                          lora.train_dir / "model").eval()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double(),
                                       lora.train_dir / "model").merge_and_unload().eval()
    assert compare_logits(logits_of(merged), logits_of(reference), valid_samples(lora))["max_abs_diff"] < 1e-10


def test_output_is_a_plain_sharded_hf_folder_that_generates(lora):
    folder = lora.merge_dir / "model"
    assert not (folder / "adapter_config.json").exists()
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()  # max_shard_size 200KB
    assert lora.report["weight_shards"] == len(shards)
    assert all(t.dtype == torch.float32 for shard in shards for t in load_file(shard).values())

    template = template_of(lora)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == template["eos_id"] and generation["pad_token_id"] == template["pad_id"]
    assert json.loads((lora.merge_dir / "template.json").read_text()) == template  # for exact prompts at evaluation

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is LlamaForCausalLM
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "alpha question 1:"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=False)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt.shape[1] and torch.equal(out[0, : prompt.shape[1]], prompt[0])
    assert isinstance(tokenizer.decode(out[0, prompt.shape[1]:]), str)


def test_chat_template_reproduces_the_training_prompt(lora):
    tokenizer = AutoTokenizer.from_pretrained(lora.merge_dir / "model")
    ingest_dir = locate_stage(lora.cfg, "ingest")
    tokenize_dir = locate_stage(lora.cfg, "tokenize")
    record = pq.read_table(ingest_dir / "data" / "beta" / "valid.parquet").to_pylist()[0]
    messages = [m for m in record["messages"] if m["role"] != "assistant"]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    settings = lora.cfg.tokenize
    expected = render_prompt(messages, tokenizer, make_template(settings.template, settings.role_markers),
                             template_of(lora)["eos_id"])
    assert list(prompt) == expected
    # ...and it is what training saw: the untrained prefix of this record's tokenized sample.
    for shard in sorted((tokenize_dir / "valid").glob("beta-*.arrow")):
        rows = [r for r in open_shard(shard).to_pylist() if r["source"] == record["source"]]
        if rows:
            first_trained = rows[0]["loss_mask"].index(1)
            assert list(prompt) == rows[0]["input_ids"][:first_trained]
            break
    else:
        pytest.fail(f"no tokenized sample for {record['source']}")


def test_model_card_names_base_tasks_config_and_losses(lora, tiny_llama_dir):
    card = (lora.merge_dir / "model" / "README.md").read_text()
    losses = json.loads((lora.train_dir / "train_summary.json").read_text())["final_valid_task_loss"]
    assert str(tiny_llama_dir) in card and "method **lora**" in card
    for task, loss in losses.items():
        assert f"| {task} |" in card and f"{loss:.4f}" in card
    assert "lr: 0.005" in card and "max_steps: 2" in card  # the training config, as YAML
    assert "apply_chat_template" in card and "max |difference|" in card
    assert "README.md" in lora.report["files"]


def test_bf16_merge_is_bf16_and_within_the_documented_bound(lora):
    cfg = load_config(lora.cfg.source, {"merge.dtype": "bf16", "merge.check_samples": 3})
    run = run_stage(cfg, "merge")  # the train output is reused: merge settings are not in its key
    assert run.directory != lora.merge_dir
    report = json.loads((run.directory / "merge_report.json").read_text())
    check = report["check"]
    assert report["dtype"] == "bf16" and check["tolerance"] == BF16_TOLERANCE and check["passed"]
    assert check["samples"] == 3 and 0 < check["max_abs_diff"] <= BF16_TOLERANCE  # bf16 rounding: not exact
    assert check["max_abs_diff"] < check["finetune_effect"]["max_abs_diff"] / 10
    shards = list((run.directory / "model").glob("*.safetensors"))
    assert shards and all(t.dtype == torch.bfloat16 for shard in shards for t in load_file(shard).values())


def test_merge_key_follows_merge_settings_and_train_output(lora):
    train_dir = lora.train_dir
    key = compute_key(lora.cfg, "merge", train_dir)
    assert lora.merge_dir.name == key[:16]
    for override in ({"merge.tolerance": 1e-3}, {"merge.dtype": "bf16"}, {"merge.check_samples": 2},
                     {"merge.max_shard_size": "1GB"}):
        assert compute_key(load_config(lora.cfg.source, override), "merge", train_dir) != key, override
    assert compute_key(load_config(lora.cfg.source, {"train.threads": 2}), "merge", train_dir) == key


def tampered(lora) -> Path:
    """A real defect, not a mock: the tiny Llama ties lm_head to the input embeddings. Add a trained
    LoRA on lm_head to the adapter: unmerged, it changes only the output head; merged, PEFT writes
    it into the shared matrix and so changes the input embeddings too."""
    train_dir = lora.train_dir.with_name("tampered")  # inside the runs root, like a real train output
    shutil.rmtree(train_dir, ignore_errors=True)
    shutil.copytree(lora.train_dir, train_dir)
    adapter = train_dir / "model"
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"]) + ["lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    rank, hidden = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape
    weights["base_model.model.lm_head.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.1
    weights["base_model.model.lm_head.lora_B.weight"] = torch.randn(512, rank, generator=generator) * 0.1
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return train_dir


def test_a_merge_that_changes_the_model_fails_with_the_numbers(lora, tmp_path):
    out = tmp_path / "merge"
    out.mkdir()
    with pytest.raises(MergeCheckFailed, match=r"merge check failed: .* by up to [0-9.]+ in a logit, above "
                                                r"merge.tolerance 0.0001 .*lm_head"):
        run_merge(lora.cfg, tampered(lora), out)
    report = json.loads((out / "merge_report.json").read_text())
    assert not report["check"]["passed"] and report["check"]["max_abs_diff"] > 100 * FP32_TOLERANCE
    assert not (out / "model" / "README.md").exists()  # no model card for a model that failed its check


def test_a_small_model_is_checked_in_float64_on_the_cpu(lora):
    check = lora.report["check"]
    assert check["precision"] == "float64" and check["device"] == "cpu" and check["token_budget"] is None
    assert check["model_parameters"] <= check["float64_max_parameters"] == merge.FLOAT64_CHECK_MAX_PARAMETERS
    assert check["tolerance"] == FP32_TOLERANCE


def test_a_large_model_is_checked_in_fp32_on_a_token_budget_and_the_report_says_so(lora, tmp_path, monkeypatch):
    """Stands in for a large model on a GPU: a threshold of 1,000 parameters sends the tiny model
    down the large-model path (fp32 arithmetic, on the CPU here, where no GPU is)."""
    monkeypatch.setattr(merge, "FLOAT64_CHECK_MAX_PARAMETERS", 1000)
    monkeypatch.setattr(merge, "FP32_CHECK_TOKENS", 50)
    out = tmp_path / "merge"
    out.mkdir()
    check = run_merge(lora.cfg, lora.train_dir, out)["check"]
    assert json.loads((out / "merge_report.json").read_text())["check"] == check
    assert check["precision"] == "fp32" and check["device"] == "cpu" and check["token_budget"] == check["tokens"] == 50
    assert check["model_parameters"] > check["float64_max_parameters"] == 1000
    assert check["tolerance"] == pytest.approx(FP32_TOLERANCE + merge.FP32_CHECK_RELATIVE * check["max_abs_reference_logit"])
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"] < 0.05
    assert check["finetune_effect"]["max_abs_diff"] > 2 * check["tolerance"]  # the check still means something

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    with pytest.raises(MergeCheckFailed):
        run_merge(lora.cfg, tampered(lora), wrong)
    assert json.loads((wrong / "merge_report.json").read_text())["check"]["precision"] == "fp32"


def test_check_samples_alternate_tasks_and_fall_back_to_train_without_validation_data(tmp_path, tiny_llama_dir):
    cfg = load_config(make_project(tmp_path, tiny_llama_dir), {"ingest.valid_fraction": 0.0, "ingest.min_valid": 0})
    run_stage(cfg, "ingest")
    tokenize_dir = run_stage(cfg, "tokenize").directory
    split, samples = check_sample_ids(tokenize_dir, 5)
    assert split == "train" and len(samples) == 5
    train = TokenizedSplit(tokenize_dir, "train")
    first = {task: train.sample(int((train.task_ids == task).nonzero()[0][0]))["input_ids"].tolist() for task in (0, 1)}
    assert samples[:2] == [first[0], first[1]]  # round-robin over the tasks


def test_a_missing_train_output_is_a_clear_error(tmp_path, tiny_llama_dir):
    cfg = load_config(make_project(tmp_path, tiny_llama_dir))
    with pytest.raises(FileNotFoundError, match=r"has no hyperparameters.json: it is not a finished train output"):
        run_merge(cfg, tmp_path / "nothing", tmp_path / "out")


# ----------------------------------------------------------------------------- full fine-tuning


def test_full_finetuning_is_saved_and_checked_with_the_same_contract(full, tiny_llama_dir):
    report, check = full.report, full.report["check"]
    assert report["method"] == "full" and not report["merged"] and check["reference"] == "the trained model"
    assert check["passed"] and check["max_abs_diff"] == 0.0  # fp32 -> fp32: saved bit for bit
    assert check["finetune_effect"]["max_abs_diff"] > 0.05
    folder = full.merge_dir / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
            "README.md"} <= names
    trained = load_file(full.train_dir / "model" / "model.safetensors")
    saved = load_file(folder / "model.safetensors")
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is LlamaForCausalLM
    assert "full fine-tuning" in (folder / "README.md").read_text()


# ----------------------------------------------------------------------------- ZeRO-3


@pytest.mark.slow
def test_an_adapter_trained_under_zero3_merges_exactly(tmp_path, tiny_llama_dir):
    run = train_and_merge(make_project(tmp_path, tiny_llama_dir, grad_accum=1,
                                       launch={"num_processes": 2, "backend": "deepspeed", "zero_stage": 3}))
    assert json.loads((run.train_dir / "hyperparameters.json").read_text())["world_size"] == 2
    check = run.report["check"]
    assert check["passed"] and check["max_abs_diff"] <= FP32_TOLERANCE and check["argmax_agreement"] == 1.0
    assert check["finetune_effect"]["max_abs_diff"] > 0.05  # the gathered adapter is the trained one, not zeros
    merged = AutoModelForCausalLM.from_pretrained(run.merge_dir / "model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                        run.train_dir / "model").eval()
    ids = torch.tensor([valid_samples(run, 1)[0]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.slow
def test_a_qlora_adapter_merges_into_the_unquantized_base(tmp_path, tiny_llama_dir):
    run = train_and_merge(make_project(tmp_path, tiny_llama_dir, method="qlora", precision="bf16"))  # bitsandbytes' CPU backend
    check = run.report["check"]
    assert run.report["base_quantized_in_training"] and check["passed"] and check["max_abs_diff"] <= FP32_TOLERANCE
    assert check["finetune_effect"]["max_abs_diff"] > 0.05
    folder = run.merge_dir / "model"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert all(t.dtype == torch.float32 for t in load_file(folder / "model.safetensors").values())
    assert "merged into the unquantized base" in (folder / "README.md").read_text()
