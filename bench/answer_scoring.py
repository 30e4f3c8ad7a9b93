"""Answer-selection scoring speed on the shipped model, side by side in one run (issue #4).

    .venv/bin/python bench/answer_scoring.py [--prompts 48] [--rounds 3]

easy-VQA prompts (`[img] Q: … A:`) against the 13 answers, three ways that give the same
numbers (tests/test_scoring.py):
- naive: prompt + candidate through the whole model, once per candidate (how the published
  code scored answers, minus its missing shift);
- per prompt: the prompt once, candidates continue from its keys/values (`candidate_logprobs`);
- shared: 32 prompts as one left-padded batch, one short pass per multi-token answer
  (`shared_candidate_logprobs`, what `fromage eval offline` uses).
Rounds interleave the contenders so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from fromage.checkpoint import SHIPPED
from fromage.data.builtin import EASYVQA_ANSWERS, easyvqa_images
from fromage.evaluate.engine import Evaluator
from fromage.scoring import candidate_logprobs, candidate_logprobs_naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    ev = Evaluator.load(args.checkpoint, progress=False)
    items = easyvqa_images("test")[: args.prompts]
    feats = ev.encode_images([i.image for i in items]).features
    prompts = [[feats[j], f"Q: {item.qa[0][0]} A:"] for j, item in enumerate(items)]
    answers = [f" {a}" for a in EASYVQA_ANSWERS]
    tokens = [ev.tokens(a) for a in answers]

    def one_by_one(score) -> torch.Tensor:
        out = []
        for p in prompts:
            ids, f = ev.layout(p)
            out.append(score(ev.model, torch.tensor([ids]), f, tokens))
        return torch.stack(out)

    def shared() -> torch.Tensor:
        return ev.shared_answer_scores(prompts, answers)

    contenders = {
        "naive": lambda: one_by_one(candidate_logprobs_naive),
        "per prompt": lambda: one_by_one(candidate_logprobs),
        "shared batch": shared,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    results = {}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    for name in contenders:
        torch.testing.assert_close(results[name], results["naive"], atol=1e-3, rtol=1e-3)
    base = min(times["naive"])
    print(f"{len(prompts)} prompts × {len(answers)} answers, best of {args.rounds} rounds:")
    for name, t in times.items():
        best = min(t)
        print(f"  {name:13s} {best:7.2f} s  {len(prompts) / best:6.1f} prompts/s  {base / best:5.1f}× naive")


if __name__ == "__main__":
    main()
