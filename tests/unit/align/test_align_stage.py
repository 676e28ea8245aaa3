"""The align stage for real: its recipe as a subprocess on a tiny random Llama (CPU), after a real
fine-tuning run; the stacked adapter through merge; resume after a kill; one model in memory.

The toy preference task: the chosen answer to "question i: is it good?" always starts with "yes",
the rejected one with "no" (the rest is the same), so a model can learn the preference quickly
and a validation accuracy says whether it did."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mft_core.config import ConfigError, load_config
from mft_core.stages import run_stage, stage_chain
from tests.unit.train.test_train_stage import stage_until_killed

pytestmark = pytest.mark.slow


def make_project(root: Path, model_dir: Path, **align) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "alpha").mkdir(exist_ok=True)
    with open(root / "alpha" / "d.jsonl", "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"chat_rounds": [{"role": "human", "content": f"alpha question {i}"},
                                                 {"role": "bot", "content": f"def f{i}(x):\n    return x * {i}"}]}) + "\n")
    (root / "prefer").mkdir(exist_ok=True)
    with open(root / "prefer" / "d.jsonl", "w") as fh:
        for i in range(80):
            question, yes, no = f"question {i}: is it good?", f"yes, it is {i}", f"no, it is {i}"
            if i % 2:  # the flat form
                fh.write(json.dumps({"prompt": question, "chosen": yes, "rejected": no}) + "\n")
            else:  # MFTCoder's: two conversations differing in their last turn
                turns = [{"role": "user", "content": question}]
                fh.write(json.dumps({"chosen": turns + [{"role": "assistant", "content": yes}],
                                     "rejected": turns + [{"role": "assistant", "content": no}]}) + "\n")
    config = {
        "data": {"tasks": [{"path": "alpha"}, {"path": "prefer", "kind": "preference"}]},
        "model": {"path": str(model_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 8},
        "tokenize": {"seq_length": 96, "num_workers": 1},
        "train": {"grad_accum": 2, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1,
                  "lr": 5e-3, "precision": "fp32", "threads": 1},
        "align": {"enabled": True, "max_steps": 8, "grad_accum": 2, "rows_per_micro_batch": 2, "lr": 1e-2, "beta": 0.5,
                  "eval_every": 4, "checkpoint_every": 2, "warmup_steps": 0, **align},
        "merge": {"check_samples": 4},
    }
    (root / "pipeline.yaml").write_text(json.dumps(config))
    return root / "pipeline.yaml"


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir) -> Path:
    """The project with ingest, tokenize and train done (every align test starts from that SFT model)."""
    path = make_project(tmp_path_factory.mktemp("align"), tiny_llama_dir)
    cfg = load_config(path)
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    return path


def summary(directory: Path) -> dict:
    return json.loads((directory / "train_summary.json").read_text())


@pytest.mark.parametrize("seed", [1, 2])
def test_dpo_learns_the_toy_preference_to_a_validation_accuracy_of_at_least_0_8(project, seed):
    result = summary(run_stage(load_config(project, {"align.seed": seed}), "align").directory)
    before, after = result["valid_before"], result["valid_after"]
    assert before["loss"]["prefer"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy = reference: log 2
    assert before["accuracy"]["prefer"] == 0.0  # every reward margin is exactly 0 before training
    assert after["accuracy"]["prefer"] >= 0.8, result
    assert after["logp_accuracy"]["prefer"] >= 0.8, result
    assert after["reward_margin"]["prefer"] > 0
    # the fine-tuning task's validation loss before alignment is the fine-tuned model's own
    sft = summary(run_stage(load_config(project), "train").directory)
    assert result["sft_valid_loss_before"]["alpha"] == pytest.approx(sft["final_valid_task_loss"]["alpha"], rel=1e-6)
    assert result["sft_valid_loss_after"]["alpha"] != result["sft_valid_loss_before"]["alpha"]


def test_the_reference_is_exactly_the_fine_tuned_model_in_bf16_too(tmp_path, tiny_llama_dir):
    """Before its first step, align's model gives the fine-tuning tasks the validation loss the
    fine-tuning run measured: the SFT adapter is loaded unmerged (merged into a bf16 base, its
    update would be rounded into the base's bf16 grid, a different model)."""
    cfg = load_config(make_project(tmp_path, tiny_llama_dir), {"train.precision": "bf16", "align.max_steps": 2})
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    sft = summary(run_stage(cfg, "train").directory)["final_valid_task_loss"]["alpha"]
    result = summary(run_stage(cfg, "align").directory)
    assert result["sft_valid_loss_before"]["alpha"] == pytest.approx(sft, rel=1e-6)
    assert result["valid_before"]["loss"]["prefer"] == pytest.approx(0.6931471805599453, abs=1e-6)


@pytest.mark.parametrize("method", ["rpo", "orpo"])
def test_rpo_and_orpo_learn_the_toy_preference_too(project, method):
    result = summary(run_stage(load_config(project, {"align.method": method}), "align").directory)
    assert result["method"] == method
    assert result["valid_after"]["logp_accuracy"]["prefer"] >= 0.8, result
    assert result["valid_after"]["loss"]["prefer"] < result["valid_before"]["loss"]["prefer"]


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def test_merge_of_the_stacked_adapter_is_the_aligned_model(project, tiny_llama_dir):
    """The model merge saves = base + SFT adapter (merged) + align adapter: the policy align
    trained. The stack [s1 B1, s2 B2][A1; A2] must equal the two adapters applied in turn; merge's
    own check only compares the stacked adapter unmerged with its merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(project)
    align_dir = run_stage(cfg, "align").directory
    merged_dir = run_stage(cfg, "merge").directory / "model"
    hyper = json.loads((align_dir / "hyperparameters.json").read_text())
    sft_adapter = cfg.runs_root / hyper["sft_dir"] / "model"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    fine_tuned = PeftModel.from_pretrained(base, sft_adapter).merge_and_unload()
    aligned = PeftModel.from_pretrained(fine_tuned, align_dir / "align-adapter").eval()
    saved = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = [1, 40, 41, 42, 200, 17, 9, 300, 2]
    difference = (logits(aligned, ids) - logits(saved, ids)).abs().max().item()
    with aligned.disable_adapter():
        align_effect = (logits(aligned, ids) - logits(saved, ids)).abs().max().item()
    assert difference < 1e-4 and align_effect > 100 * difference, (difference, align_effect)
    stacked = json.loads((align_dir / "model" / "adapter_config.json").read_text())
    assert stacked["r"] == cfg.train.lora.r + cfg.align.lora.r


def test_align_loads_one_model_and_the_reference_is_it_with_the_adapter_disabled(project, monkeypatch):
    """DPO with LoRA never holds a second model: the recipe, run in this process, loads exactly one
    causal LM, and the parameters in memory are that model's plus the align adapter's."""
    from transformers import AutoModelForCausalLM

    from mft_core.align import recipe
    from mft_core.align.stage import write_align_job
    from mft_core.stages import locate_stage

    cfg = load_config(project, {"align.seed": 7, "align.max_steps": 2})
    work = cfg.runs_root / "align" / "in-process.partial"  # where job paths resolve (runs/<stage>/<key>)
    work.mkdir(parents=True)
    write_align_job(cfg, locate_stage(cfg, "train"), work)
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loads.append(sum(p.numel() for p in model.parameters()))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    monkeypatch.setenv("MFT_TRAIN_THREADS", "1")
    recipe.main(work)  # (tests/conftest.py resets accelerate's process-wide state afterwards)
    hyper = json.loads((work / "hyperparameters.json").read_text())
    adapters = [load_file(folder / "adapter_model.safetensors")
                for folder in (work / "align-adapter", cfg.runs_root / hyper["sft_dir"] / "model")]
    assert len(loads) == 1, loads
    assert hyper["parameters_in_memory"] == loads[0] + sum(t.numel() for a in adapters for t in a.values())
    assert hyper["reference"] == recipe.REFERENCE


@pytest.mark.parametrize("parameters", ["lora", "full"])
def test_align_killed_after_a_checkpoint_then_resumed_equals_uninterrupted(project, parameters):
    """LoRA, and full-parameter align, whose resumed run must read the reference log-probs it
    computed before its first step (its model is no longer the reference)."""
    overrides = ["align.seed=11", f"align.parameters={parameters}"]
    cfg = load_config(project, {"align.seed": 11, "align.parameters": parameters})
    partial = stage_until_killed(project, cfg.runs_root, "step-0000004/COMPLETE", "align", tuple(overrides))
    assert partial is not None, "the run ended before its step-4 checkpoint"
    assert not (partial / "checkpoints" / "step-0000008").exists()  # the kill left steps 5-8 to do
    resumed = run_stage(cfg, "align")
    assert resumed.computed
    weights = "align-adapter/adapter_model.safetensors" if parameters == "lora" else "model/model.safetensors"
    resumed_adapter = load_file(resumed.directory / weights)
    resumed_metrics = [json.loads(l) for l in (resumed.directory / "metrics.jsonl").read_text().splitlines()]
    again = run_stage(cfg, "align", force=True)  # the same key, uninterrupted
    fresh_adapter = load_file(again.directory / weights)
    fresh_metrics = [json.loads(l) for l in (again.directory / "metrics.jsonl").read_text().splitlines()]
    for name, tensor in fresh_adapter.items():
        torch.testing.assert_close(resumed_adapter[name], tensor, rtol=0, atol=1e-6)
    assert [m["step"] for m in resumed_metrics] == [m["step"] for m in fresh_metrics]
    for a, b in zip(resumed_metrics, fresh_metrics):
        for key in ("loss", "grad_norm", "lr"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (key, a["step"])


def test_without_align_merge_takes_the_fine_tuned_model(project):
    """align off: the chain skips it and merge's upstream is train (its key then names train's
    output); on: merge reads align's, and the two merged models differ."""
    on = load_config(project)
    off = load_config(project, {"align.enabled": False})
    assert stage_chain(on) == ["ingest", "tokenize", "train", "align", "merge", "evaluate"]
    assert stage_chain(off) == ["ingest", "tokenize", "train", "merge", "evaluate"]
    with pytest.raises(ValueError, match="align.enabled: true"):
        run_stage(off, "align")


def test_align_needs_a_preference_task_and_refuses_qlora(project):
    with pytest.raises(ConfigError, match="needs preference data"):
        load_config(project, {"data.tasks": [{"path": "alpha"}]})
    with pytest.raises(ConfigError, match="qlora"):
        load_config(project, {"train.method": "qlora", "train.precision": "bf16"})


def test_full_parameter_dpo_precomputes_the_reference_once_and_merge_takes_the_full_model(project, monkeypatch):
    """align.parameters full: every weight trains from the fine-tuned model (the SFT adapter merged
    into the fp32 weights); the reference is a table of every pair's log-probs computed by that
    model before the first step, so policy = reference there (pair loss log 2); one model loaded."""
    cfg = load_config(project, {"align.parameters": "full", "align.lr": 2e-3, "align.seed": 5})
    out = run_stage(cfg, "align").directory
    result, hyper = summary(out), json.loads((out / "hyperparameters.json").read_text())
    from mft_core.align import recipe

    assert hyper["reference"] == recipe.PRECOMPUTED and hyper["train"]["method"] == "full"
    table = torch.load(out / "reference_logps_train.pt")
    assert table.shape[1] == 2 and (table < 0).all()
    assert result["valid_before"]["loss"]["prefer"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert result["valid_after"]["accuracy"]["prefer"] >= 0.8, result
    merged = run_stage(cfg, "merge").directory
    assert json.loads((merged / "merge_report.json").read_text())["method"] == "full"


def test_lora_align_after_full_fine_tuning_saves_the_merged_full_model(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(make_project(tmp_path, tiny_llama_dir), {"train.method": "full", "train.lr": 1e-3})
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    align_dir = run_stage(cfg, "align").directory
    assert json.loads((align_dir / "hyperparameters.json").read_text())["train"]["method"] == "full"
    merged = run_stage(cfg, "merge").directory / "model"
    sft = AutoModelForCausalLM.from_pretrained(run_stage(cfg, "train").directory / "model", dtype=torch.float32)
    aligned = PeftModel.from_pretrained(sft, align_dir / "align-adapter").eval()
    saved = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = [1, 40, 41, 42, 200, 17, 9, 300, 2]
    assert (logits(aligned, ids) - logits(saved, ids)).abs().max().item() < 1e-4


def test_evaluate_adds_the_fine_tuned_model_before_align_when_a_run_without_align_evaluated_it(project):
    """A run without align (its preference task only ingested and tokenized) merges and evaluates
    the SFT model; the run with align then reports base, that model and the aligned one, the
    middle row read from the first run's evaluation (the same train output: nothing retrains)."""
    evaluate = {"evaluate": {"languages": ["python"], "limit": 1, "max_new_tokens": 16, "evaluate_base": False}}
    flat = lambda section: {f"evaluate.{k}": v for k, v in section["evaluate"].items()}
    without = load_config(project, {"align.enabled": False, **flat(evaluate)})
    with_align = load_config(project, flat(evaluate))
    assert run_stage(without, "train").directory == run_stage(with_align, "train").directory
    run_stage(without, "merge")
    sft_eval = run_stage(without, "evaluate").directory
    run_stage(with_align, "align")
    run_stage(with_align, "merge")
    out = run_stage(with_align, "evaluate").directory
    models = json.loads((out / "summary.json").read_text())["models"]
    before = json.loads((sft_eval / "summary.json").read_text())["models"]["finetuned"]
    assert list(models) == ["sft", "finetuned"]
    assert models["sft"]["pass_at_k"] == before["pass_at_k"] and models["sft"]["evaluation_output"].endswith(sft_eval.name)
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"sft", "finetuned"}
