"""The stage plan: what a stage searches, what it fixes, and where each fixed value came from.

A stage's fixed values are the best ones the stages before it found (or values the user set
by hand); the incumbent is the study's defaults with those values, and is the stage's first
trial, so a stage never ends worse than the one before it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import search_spaces
from search_spaces import SearchSpace, SearchSpaceError
from tuner.config import DEFAULT_STUDY, StudyConfig
from tuner.errors import StageRefused, UserError
from tuner.nested import flatten, get_path, merged
from tuner.race import deterministic_settings


@dataclass(frozen=True)
class Source:
    """Where a fixed value came from: a stage's trial, the user's hand, or a warm start."""

    stage: str | None = None  # None: set by hand (or, with an origin, a warm start)
    trial: int | None = None
    value: float | None = None
    origin: str | None = None  # a warm start's value: its file or study, and trial

    @property
    def label(self) -> str:
        if self.origin is not None:
            return f"start {self.origin}"
        return "set by hand" if self.stage is None else f"{self.stage}#{self.trial}"

    def as_dict(self) -> dict[str, Any]:
        data = {"stage": self.stage, "trial": self.trial, "value": self.value}
        return data if self.origin is None else {**data, "origin": self.origin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Source:
        return cls(data.get("stage"), data.get("trial"), data.get("value"), data.get("origin"))


@dataclass(frozen=True)
class Best:
    """The best finished trial of a stage, as the stages after it need it."""

    stage: str
    number: int
    value: float
    config: dict[str, Any]
    lineage: dict[str, Source]


@dataclass(frozen=True)
class StagePlan:
    """Everything one stage needs to run."""

    study: StudyConfig
    stage: str
    space: SearchSpace  # without the keys fixed by hand
    fixed: dict[str, Any]  # flat config key -> value fixed for this stage
    lineage: dict[str, Source]
    incumbent: dict[str, Any]  # the trial config of the stage's first trial

    @property
    def name(self) -> str:
        return self.study.stage_name(self.stage)

    @property
    def index(self) -> int:
        return self.study.stages.index(self.stage)

    def lineage_dict(self) -> dict[str, dict[str, Any]]:
        return {key: source.as_dict() for key, source in self.lineage.items()}


BestOf = Callable[[str], "Best | None"]


def load_space(study: StudyConfig, stage: str) -> SearchSpace:
    """A stage's search space with the study file's changes, checked against the config."""
    try:
        space = search_spaces.load(stage, study.spaces.get(stage))
        config = study.config
        for key in (*space.keys, *flatten(dict(space.settings))):
            get_path(config, key)
    except SearchSpaceError as exc:
        raise UserError(f"{study.source}: {exc}") from None
    except KeyError as exc:
        raise UserError(
            f"{study.source}: stage {stage} sets '{exc.args[0]}', which is not a key of defaults."
        ) from None
    return space


def plan_stage(study: StudyConfig, stage: str, best_of: BestOf) -> StagePlan:
    """Plan a stage from the best trials of the stages before it.

    Raises StageRefused when a value it needs has no finished trial to come from and was
    not set by hand.
    """
    if stage not in study.stages:
        raise UserError(
            f"Unknown stage '{stage}'; this study's stages: {', '.join(study.stages)}."
        )
    index = study.stages.index(stage)
    earlier = study.stages[:index]
    hand = set(flatten(study.overrides))
    searched_by: dict[str, str] = {}  # key -> the last earlier stage that searches it
    for before in earlier:
        for key in load_space(study, before).keys:
            searched_by[key] = before
    needed = {key: s for key, s in searched_by.items() if key not in hand}

    source = next((b for s in reversed(earlier) if (b := best_of(s)) is not None), None)
    done = earlier[: earlier.index(source.stage) + 1] if source else ()
    missing = [key for key, s in needed.items() if s not in done]
    if missing:
        first = min((needed[key] for key in missing), key=study.stages.index)
        raise StageRefused(_refusal(study, stage, first, missing, needed))

    fixed: dict[str, Any] = {}
    lineage: dict[str, Source] = {}
    for key, searcher in needed.items():
        assert source is not None
        fixed[key] = get_path(source.config, key)
        own = searcher == source.stage
        lineage[key] = (
            Source(source.stage, source.number, source.value)
            if own
            else (source.lineage.get(key, Source()))
        )
    space = load_space(study, stage)
    for key in hand & {*searched_by, *space.keys}:
        fixed[key] = get_path(study.config, key)
        lineage[key] = Source()
    for key, origin in study.start_origin.items():  # a warm start's values, where not fixed
        if key not in lineage and key not in hand:
            lineage[key] = Source(origin=origin)
    space = space.without(hand)
    incumbent = merged(study.config, fixed, deterministic_settings(study, space.settings))
    return StagePlan(study, stage, space, fixed, lineage, incumbent)


def stale_keys(plan: StagePlan, stored: Mapping[str, Any]) -> list[str]:
    """The fixed keys whose value or source differs from a stage's stored lineage."""
    changed = []
    for key, source in plan.lineage.items():
        before = stored.get(key)
        if before is None or Source.from_dict(before) != source:
            changed.append(key)
    return changed


def rerun_command(study: StudyConfig, stage: str, *extra: str) -> str:
    """The command that runs one stage of this study."""
    args = ["python -m tuner run"]
    if study.name != DEFAULT_STUDY:
        args.append(f"study={study.arg}")
    args.append(f"stage={stage}")
    return " ".join([*args, *extra])


def _refusal(
    study: StudyConfig, stage: str, first: str, missing: list[str], needed: dict[str, str]
) -> str:
    keys = [key for key in missing if needed[key] == first]
    example = ", ".join(f"{key}=..." for key in keys)
    return (
        f"Stage {stage} needs the best {', '.join(keys)} from stage {first}, which has no"
        f" finished trial: run `{rerun_command(study, first)}` first, or set them by hand"
        f" ({example})."
    )
