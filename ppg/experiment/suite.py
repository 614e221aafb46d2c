"""An experiment suite: policy classes x problems x seeds on one base config, as one YAML file.

    name: paper
    base:                              # overrides of the default config, as on the command line
      run.iterations: 20
    classes:                           # label -> objective.policy_class
      full: {type: full}
      greedy: {type: greedy}
      k2: {type: k_step, k: 2}
      segment: {type: segment}
    problems:                          # name -> target reward (+ optional overrides for that problem)
      myopic: {target_reward: 0.12, classes: [full, greedy, k2]}
      segmented: {target_gain: 0.05, overrides: {problem.num_turns: 6}}
    seeds: [0, 1, 2]
    selector: {pilot_episodes: 64}     # the automatic class selector's pilot batch (omit to skip)

Every cell's config is validated when the suite loads, so a typo fails before an hour of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ppg.config import ConfigError, PPGConfig, check_trainable, load_config, parse_yaml
from ppg.objectives import PolicyClass


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProblemEntry(_Strict):
    target_reward: float | None = Field(
        default=None, description="mean reward per turn that counts as solved"
    )
    target_gain: float | None = Field(
        default=None, description="or: solved = the initial policy's reward (pilot batch) + this gain"
    )
    classes: list[str] | None = Field(default=None, description="subset of the suite's classes to run here")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config overrides for this problem")

    @model_validator(mode="after")
    def _one_target(self) -> ProblemEntry:
        if (self.target_reward is None) == (self.target_gain is None):
            raise ValueError("give exactly one of target_reward and target_gain")
        return self


class SelectorSpec(_Strict):
    pilot_episodes: PositiveInt = Field(default=64, description="episodes in the pilot batch")


class Suite(_Strict):
    name: str = Field(min_length=1)
    base: dict[str, Any] = Field(default_factory=dict)
    classes: dict[str, PolicyClass] = Field(min_length=1)
    problems: dict[str, ProblemEntry] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    selector: SelectorSpec | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @field_validator("classes")
    @classmethod
    def _labels_are_folder_names(cls, classes: dict) -> dict:
        bad = [k for k in classes if not k.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"class labels become folder names: use letters, digits, - and _ (got {bad})")
        return classes

    @model_validator(mode="after")
    def _known_classes(self) -> Suite:
        from ppg.env.problems import PROBLEMS

        for name, entry in self.problems.items():
            if name not in PROBLEMS:
                raise ValueError(f"problems.{name}: unknown problem; registered: {sorted(PROBLEMS)}")
            unknown = set(entry.classes or []) - set(self.classes)
            if unknown:
                raise ValueError(f"problems.{name}.classes names unknown classes {sorted(unknown)}")
            if entry.target_gain is not None and self.selector is None:
                raise ValueError(f"problems.{name}.target_gain needs the selector's pilot batch (selector:)")
        return self

    def classes_for(self, problem: str) -> list[str]:
        return self.problems[problem].classes or list(self.classes)

    def cells(self) -> list[tuple[str, str, int]]:
        """(problem, class label, seed), problem-major: a problem's curves complete early."""
        return [(p, c, s) for p in self.problems for c in self.classes_for(p) for s in self.seeds]

    def config(self, problem: str, label: str | None, seed: int) -> PPGConfig:
        """The cell's config: defaults <- base <- the problem's overrides <- problem, class, seed."""
        overrides = {
            **self.base,
            **self.problems[problem].overrides,
            "problem.name": problem,
            "run.seed": seed,
        }
        config = load_config(None, [f"{k}={_yaml_value(v)}" for k, v in overrides.items()])
        if label is not None:
            objective = config.objective.model_copy(update={"policy_class": self.classes[label]})
            config = config.model_copy(update={"objective": objective})
        name = f"{problem}-{label or 'pilot'}-seed{seed}"
        return config.model_copy(update={"run": config.run.model_copy(update={"name": name})})


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist (see experiments/*.yaml for examples)")
    try:
        raw = parse_yaml(path.read_text())
        suite = Suite.model_validate(raw)
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from None
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise SuiteError(f"{path}: invalid suite\n" + "\n".join(lines)) from None
    for problem in suite.problems:  # every cell must be a valid run before anything starts
        for label in suite.classes_for(problem):
            try:
                check_trainable(suite.config(problem, label, suite.seeds[0]))
            except ConfigError as e:
                raise SuiteError(f"{path}: problem {problem!r} x class {label!r}: {e}") from None
    return suite


# The output folder's layout (see ppg/experiment/runner.py): the runner writes it, the report reads it.
def cell_dir(out: Path, problem: str, label: str, seed: int) -> Path:
    return out / "runs" / problem / label / f"seed{seed}"


def pilot_path(out: Path, problem: str, seed: int) -> Path:
    return out / "pilots" / f"{problem}-seed{seed}.json"
