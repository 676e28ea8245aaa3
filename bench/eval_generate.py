"""Generation speed: new tokens per second, batched vs one prompt at a time, with identical greedy outputs.

Ours: `generate_batch` over prompts sorted by length (as the evaluate stage plans them), a
finished row leaving the batch at once (its KV-cache rows too), batches of --batch-size. Baseline
(named): the same decoding loop with one prompt at a time, on the same prompts, in the same run.
For context, transformers' `model.generate` on the same batches (every row is computed until the
longest one ends). Every row's greedy output must be the same in all three, or the script fails.

    .venv/bin/python bench/eval_generate.py [--problems 4] [--batch-size 8] [--max-new-tokens 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import REPO, save, table  # noqa: E402
from mft_core.eval.generate import (GenerationSettings, generate_batch, load_generation_model,  # noqa: E402
                                    plan_work, render_prompt_for)
from mft_core.eval.problems import select_problems  # noqa: E402
from mft_core.modeling import SMOLLM2_ALIAS, resolve_model  # noqa: E402


def hf_generate(gm, items, settings) -> list[str]:
    """transformers' generate on one left-padded batch: the decoding this project used before."""
    from transformers import GenerationConfig

    width = max(len(item.prompt.ids) for item in items)
    ids = torch.full((len(items), width), gm.eos_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, width - len(item.prompt.ids):] = torch.tensor(item.prompt.ids)
        mask[row, width - len(item.prompt.ids):] = 1
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(gm.stop_ids), pad_token_id=gm.eos_id)
    with torch.no_grad(), gm.autocast():
        out = gm.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    texts = []
    for row in range(len(items)):
        tokens = out[row, width:].tolist()
        eos = next((i for i, t in enumerate(tokens) if t in gm.stop_ids), len(tokens))
        texts.append(gm.tokenizer.decode(tokens[:eos], skip_special_tokens=False))
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=4, help="problems per language (default 4)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    folder = resolve_model(SMOLLM2_ALIAS, REPO / "runs")
    gm = load_generation_model(folder, "fp32")
    problems = select_problems(limit=args.problems)
    prompts = {p.task_id: render_prompt_for(p, "completion", gm.tokenizer) for p in problems}
    items = plan_work(problems, prompts, 1, set())  # longest first, as the stage plans them
    # No stop rules here: every row generates to EOS or max_new_tokens, the same work in every
    # method (stop rules would only shorten all three alike); a row still leaves at EOS.
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]

    def run(method):
        started = time.perf_counter()
        texts = method()
        return time.perf_counter() - started, texts

    one_s, one = run(lambda: [generate_batch(gm, [item], "completion", settings, stop_early=False)[0] for item in items])
    ours_s, ours = run(lambda: [r for batch in batches for r in generate_batch(gm, batch, "completion", settings,
                                                                               stop_early=False)])
    hf_s, hf = run(lambda: [text for batch in batches for text in hf_generate(gm, batch, settings)])
    tokens = sum(r["new_tokens"] for r in ours)
    same = [r["raw"] for r in ours] == [r["raw"] for r in one] == hf
    rows = [["ours, one prompt at a time (baseline)", round(tokens / one_s, 1), 1.0],
            [f"ours, batches of {args.batch_size}, finished rows leave", round(tokens / ours_s, 1),
             round(one_s / ours_s, 2)],
            [f"transformers generate, batches of {args.batch_size}", round(tokens / hf_s, 1), round(one_s / hf_s, 2)]]
    print(f"SmolLM2-135M fp32, {len(items)} HumanEval-X prompts ({args.problems} per language), greedy, "
          f"up to {args.max_new_tokens} new tokens, {tokens} generated, {args.threads} threads")
    print(table(["method", "new tokens/s", "vs one at a time"], rows))
    print(f"identical greedy outputs in all three: {same}")
    save("eval_generate", {"settings": vars(args), "prompts": len(items), "new_tokens": tokens,
                           "seconds": {"one_at_a_time": one_s, "ours_batched": ours_s, "hf_generate": hf_s},
                           "speedup_vs_one_at_a_time": one_s / ours_s, "hf_speedup": one_s / hf_s,
                           "identical_outputs": same})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
