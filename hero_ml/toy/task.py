"""Tasks as data: a YAML file names the prompts, the judge's target and what the task is about.

Shipped tasks live in hero_ml/toy/tasks/; any other file path works too. docs/TASKS.md documents
the format. A task's prompts must be sentences of the caption grammar (the toy model's language).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hero_ml.config import format_validation_error, load_yaml
from hero_ml.errors import HeroError
from hero_ml.toy.captions import parse_caption
from hero_ml.toy.judge import Target

TASKS_DIR = Path(__file__).parent / "tasks"


class TaskError(HeroError, ValueError):
    """A task file that cannot be used; the message says which field and why."""


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="Short id, as in `--task NAME`.")
    category: Literal[
        "counting", "attribute-binding", "anomaly-correction", "personalization", "content-safety"
    ]
    description: str = Field(min_length=1, description="What a good image is, for people.")
    prompts: tuple[str, ...] = Field(
        min_length=1,
        description="The task's prompts: training uses one (sampling.prompt), evaluation all in turn.",
    )
    target: Target = Field(description="What the judge accepts on the training prompts.")
    eval_prompts: tuple[str, ...] = Field((), description="Unseen prompts to measure transfer.")
    eval_target: Target | None = Field(None, description="Judge target on eval_prompts (default: target).")

    @field_validator("prompts", "eval_prompts")
    @classmethod
    def _in_the_grammar(cls, prompts: tuple[str, ...]) -> tuple[str, ...]:
        for prompt in prompts:
            parse_caption(prompt)  # raises ValueError saying what it could not read
        return prompts


def load_task(name_or_path: str | Path) -> Task:
    """A shipped task by name (`counting`), or a task file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TASKS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TaskError(f"no task named {name_or_path!r}; shipped tasks: {', '.join(task_names())}")
    try:
        data = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TaskError(f"cannot read task file {path}: {err}") from None
    try:
        return Task.model_validate(data)
    except ValidationError as err:
        raise TaskError(f"invalid task file {path}:\n{format_validation_error(err, Task)}") from None


def task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
