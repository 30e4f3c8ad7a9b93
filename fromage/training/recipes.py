"""Named training recipes: `fromage train --recipe NAME` (settings given after it still apply).

- `quick` (the default, `make train`): ≤ 15 minutes on 2 CPU cores. Anyone can reproduce
  training end to end with it; it cannot teach captions, answers or context (BENCHMARKS.md).
- `ship`: the recipe of the shipped weights (DESIGN §9). Hours on 2 CPU cores, minutes on a
  GPU; a fixed number of steps (the schedule does not depend on the clock), so an interrupted
  run resumes exactly when the same command runs again. Its run directory lives under
  FROMAGE_HOME (`runs/ship`), outside the work tree, so a run can span several sittings.
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
        # After the loop, refinement fits the retrieval maps (only) to the final `[RET]` states of
        # captions, requests and dialogues: name → Twitter R@1 0.29 → 0.44 (BENCHMARKS.md, "The
        # shipped model"). Context is the joint loop's work: its `[RET]` reads stories and chats.
        refine_steps=4000,
    )


SHIP_STEPS = 4000
"""Joint steps of the ship recipe: ~2.4 s a step on 2 CPU cores (32 captions, 64 caption
rows and 32 contexts in the retrieval pass), ~2.7 h of steps (BENCHMARKS.md, "The ship recipe")."""

RECIPES = {"quick": quick, "ship": ship}


def recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]()
