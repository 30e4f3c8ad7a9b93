"""Named training recipes: `fromage train --recipe NAME` (settings given after it still apply).

- `quick` (the default, `make train`): ≤ 15 minutes on 2 CPU cores. Anyone can reproduce
  training end to end with it; it cannot teach captions, answers or context (BENCHMARKS.md).
- `ship` then `ship-continue`: the two stages of the shipped weights (DESIGN §9). Hours on
  2 CPU cores, minutes on a GPU; fixed numbers of steps (the schedule does not depend on the
  clock), so an interrupted stage resumes exactly when the same command runs again. Their run
  directories live under FROMAGE_HOME (`runs/ship`, `runs/ship-continue`), outside the work
  tree, so a run can span several sittings. The second stage starts from the first's
  checkpoint with its own schedule, a mix weighted towards contexts, and answer-only loss on
  questions; then refinement, on captions, their variants and context prompts. Its checkpoint
  is the shipped `fromage/weights/default`.

```bash
fromage train --recipe ship && fromage train --recipe ship-continue
```
"""

from __future__ import annotations

from ..config import DataConfig, TaskMix, TrainConfig, embedded_recipe_model
from ..paths import home


def quick() -> TrainConfig:
    return TrainConfig()


def ship() -> TrainConfig:
    return TrainConfig(
        model=embedded_recipe_model(),
        data=DataConfig(
            sources=["emoji", "easyvqa"],
            emoji_styles=["google", "fluent-3d", "noto", "fluent-flat"],
            easyvqa_per_class=40,
            qa_caption_forms=4,
            qa_caption_share=0.5,
            qa_retrieval_forms=2,
            request_forms=2,
        ),
        tasks=TaskMix(batch_size=32),
        output_dir=str(home() / "runs" / "ship"),
        max_minutes=0.0,
        max_steps=SHIP_STEPS,
        batch_size=32,
        retrieval_batch_size=64,
        lr=1e-3,
        warmup_steps=100,
        save_every=50,
        log_every=10,
        eval_every=0,
        # Refinement runs once, after the second stage (`ship_continue`).
        refine_steps=0,
    )


def ship_continue() -> TrainConfig:
    """Stage 2: from stage 1's checkpoint, more contexts per step and a mix weighted towards
    stories, dialogues and chats; the captioning pass predicts answers, not questions."""
    config = ship()
    # The same seed as stage 1: its caption order and context draws start over, under
    # another mix (held-out concepts are a hash of the name, not drawn from the seed).
    config.init_from = str(home() / "runs" / "ship" / "checkpoint")
    config.output_dir = str(home() / "runs" / "ship-continue")
    config.data.qa_answer_only = True
    config.data.qa_caption_forms = 8
    config.tasks = TaskMix(batch_size=40, request=0.2, dialogue=0.2, story=0.25, category=0.1, chat=0.25)
    config.max_steps = CONTINUE_STEPS
    config.lr = 5e-4
    config.warmup_steps = 50
    # After the loop, refinement fits the retrieval maps (only) to the final `[RET]` states of
    # captions, requests and dialogues (name → Twitter R@1 0.31 → 0.43), and of 10,000 prompts
    # drawn from the task mix for 15% of each batch: without them refinement undoes what the
    # loop learned about context (BENCHMARKS.md, "Stage 2" and "Contexts in refinement").
    config.refine_steps = 4000
    config.refine_contexts = 10_000
    config.refine_context_share = 0.15
    return config


SHIP_STEPS = 4000
"""Joint steps of the ship recipe: ~2.4 s a step on 2 CPU cores (32 captions, 64 caption
rows and 32 contexts in the retrieval pass), ~2.7 h of steps (BENCHMARKS.md, "The ship recipe")."""

CONTINUE_STEPS = 2000
"""Joint steps of stage 2: ~3.5 s a step on 2 CPU cores (40 contexts), ~2 h."""

RECIPES = {"quick": quick, "ship": ship, "ship-continue": ship_continue}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
