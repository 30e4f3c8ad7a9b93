"""The ship recipe's retrieval contexts (training/tasks.py) and training with them."""

import json
import random

import torch

from fromage.config import TaskMix
from fromage.data.examples import Example
from fromage.data.requests import HELD_OUT_TEMPLATES, TRAINING_TEMPLATES
from fromage.training.tasks import TaskSampler

from .test_train import tiny_config, tiny_world  # noqa: F401  (fixture)

QA = (
    ("what color is the shape?", "red"),
    ("what shape is in the image?", "circle"),
    ("is there a blue shape?", "no"),
)


def _examples() -> list[Example]:
    named = [Example(f"{i}.png", f"thing {i}", "data.tsv", f"thing {i}") for i in range(6)]
    shapes = [Example(f"s{i}.png", "a red circle", "easyvqa", "a red circle", QA) for i in range(3)]
    return named + shapes


def test_queries_are_well_formed_and_use_only_training_templates():
    examples = _examples()
    sampler = TaskSampler(examples, TaskMix(batch_size=4))
    assert sampler.kinds == ["request", "dialogue", "chat"]  # no emoji: no stories or categories
    held_out_starts = {t.split("{")[0] for t in HELD_OUT_TEMPLATES if not t.startswith("{")}
    kinds = set()
    for query in sampler.draw(400, random.Random(0)):
        kinds.add(query.kind)
        assert 0 <= query.target < len(examples)
        assert all(isinstance(p, str) or 0 <= p < len(examples) for p in query.pieces)
        last = query.pieces[-1]
        assert isinstance(last, str) and not any(last.startswith(s) for s in held_out_starts), last
        if query.kind == "dialogue":
            assert examples[query.target].qa and last.startswith("Q: ")
        if query.kind == "request":
            assert examples[query.target].caption in last
    assert kinds == {"request", "dialogue", "chat"}
    # The held-out forms share no sentence form with the training ones.
    assert not set(HELD_OUT_TEMPLATES) & set(TRAINING_TEMPLATES)


def test_the_same_seed_draws_the_same_queries():
    sampler = TaskSampler(_examples(), TaskMix(batch_size=4))
    assert sampler.draw(50, random.Random("0/3/0")) == sampler.draw(50, random.Random("0/3/0"))


def test_training_with_contexts_runs_and_resumes_exactly(tiny_world, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from fromage.training.loop import train

    def config(out, **kw):
        return tiny_config(tiny_world, out, max_steps=5, refine_steps=0, tasks=TaskMix(batch_size=3), **kw)

    result = train(config(tmp_path / "full"))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())
    train(config(tmp_path / "split", stop_at_step=2))
    train(config(tmp_path / "split"))
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "caption_loss" in r] == [1, 2, 3, 4, 5]  # went on from step 2
    full = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "checkpoint" / "model.safetensors"))
    for name in full:
        torch.testing.assert_close(full[name], split[name], atol=1e-6, rtol=1e-5)


def test_contexts_change_what_is_learned(tiny_world, tmp_path):  # noqa: F811
    """The contexts reach the loss: the same run without them ends elsewhere."""
    from safetensors.torch import load_file

    from fromage.training.loop import train

    for name, tasks in (("with", TaskMix(batch_size=3)), ("without", TaskMix())):
        train(tiny_config(tiny_world, tmp_path / name, max_steps=3, refine_steps=0, tasks=tasks))
    a = load_file(str(tmp_path / "with" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "without" / "checkpoint" / "model.safetensors"))
    assert not torch.equal(a["ret_embedding"], b["ret_embedding"])


def test_refinement_reads_context_prompts_when_asked(tiny_world, tmp_path):  # noqa: F811
    """`refine_contexts` draws prompts from the task mix (here without contexts in the loop),
    computes their `[RET]` states and gives them a share of each refinement batch: the maps
    end elsewhere than after refinement on captions alone."""
    from safetensors.torch import load_file

    from fromage.training.loop import train

    for name, n in (("with", 12), ("without", 0)):
        train(tiny_config(tiny_world, tmp_path / name, max_steps=2, refine_steps=10, refine_contexts=n))
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert summary["refine/contexts"] == 12
    assert json.loads((tmp_path / "without" / "summary.json").read_text())["refine/contexts"] == 0
    a = load_file(str(tmp_path / "with" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "without" / "checkpoint" / "model.safetensors"))
    assert torch.equal(a["ret_embedding"], b["ret_embedding"])  # the loop is the same
    assert not torch.equal(a["text_ret_map.weight"], b["text_ret_map.weight"])
