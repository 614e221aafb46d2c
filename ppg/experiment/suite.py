"""An experiment suite: methods x problems x seeds on one base config, as one YAML file.

    name: paper
    base:                              # overrides of the default config, as on the command line
      run.iterations: 20
    methods:                           # label -> a policy class, trained online by policy gradient
      full: {type: full}
      greedy: {type: greedy}
      k2: {type: k_step, k: 2}
      segment: {type: segment}
      ppo:                             # or a class with learner overrides (the PPO baseline) ...
        policy_class: {type: full}
        overrides: {learner.algorithm: ppo}
      offline_k2:                      # ... or trained offline on logged conversations of the
        policy_class: {type: k_step, k: 2}   # initial policy (ppg collect; the same data budget)
        offline: true
    problems:                          # name -> target reward (+ optional overrides for that problem)
      myopic: {target_reward: 0.12, methods: [full, greedy, k2]}
      segmented: {target_gain: 0.05, overrides: {problem.num_turns: 6}}
      "my_problem:OneTopic": {target_reward: 0.5}   # a plug-in by import path (README: plug-ins)
    seeds: [0, 1, 2, 3, 4]
    eval_episodes: 64                  # held-out conversations per run (the score of a run)
    selector: {pilot_episodes: 64}     # the automatic class selector (omit to skip)

Every problem also gets the initial policy's row (no RL: the held-out evaluation of the warm start)
and, with a selector, the selector's own runs (its pick per seed, trained with an independent
training seed). Every cell's config is validated when the suite loads, so a typo fails before an
hour of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from ppg.config import PPGConfig, check_trainable, flatten, load_config, parse_yaml
from ppg.env.factory import check_environment
from ppg.env.problems import problem_class
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
    methods: list[str] | None = Field(default=None, description="subset of the suite's methods to run here")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config overrides for this problem")

    @model_validator(mode="after")
    def _one_target(self) -> ProblemEntry:
        if (self.target_reward is None) == (self.target_gain is None):
            raise ValueError("give exactly one of target_reward and target_gain")
        return self


class Method(_Strict):
    """One row of the comparison: a policy class and how it is trained."""

    policy_class: PolicyClass
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="config overrides for this method (e.g. learner.algorithm: ppo)"
    )
    offline: bool = Field(
        default=False,
        description="train on logged conversations of the initial policy (run.offline_data), "
        "as many as an online run samples, instead of online rollouts",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``{type: greedy}`` is the policy class of an online method."""
        if isinstance(value, dict) and "type" in value:
            return {"policy_class": value}
        return value


INITIAL, SELECTOR = "initial", "selector"  # the rows every problem gets besides its methods
SELECTOR_SEED_OFFSET = 1000  # the selector's runs train with seed + this: independent of the methods'


class SelectorSpec(_Strict):
    pilot_episodes: PositiveInt = Field(default=64, description="episodes in the pilot batch")
    reselect_every: PositiveInt | None = Field(
        default=None,
        description="the selector's run pilots again at its own policy every this many iterations "
        "and may change class; None = one pick, at the initial policy",
    )
    max_pilot_episodes: PositiveInt | None = Field(
        default=None,
        description="grow a pilot by pilot_episodes at a time while the full-return gradient's signal "
        "to noise is below min_signal_to_noise, up to this many episodes; None = a fixed pilot",
    )
    min_signal_to_noise: PositiveFloat = Field(
        default=1.0,
        description="||mu_full||^2 over the noise of its pilot estimate below which a pilot grows "
        "(with max_pilot_episodes): under ~1 the pilot cannot resolve the full gradient's direction",
    )

    @model_validator(mode="after")
    def _pilot_growth(self) -> SelectorSpec:
        top = self.max_pilot_episodes
        if top is not None and not self.pilot_episodes <= top <= 10 * self.pilot_episodes:
            raise ValueError(
                f"selector.max_pilot_episodes ({top}) must be between pilot_episodes "
                f"({self.pilot_episodes}) and 10 x pilot_episodes ({10 * self.pilot_episodes})"
            )
        return self


class Suite(_Strict):
    name: str = Field(min_length=1)
    base: dict[str, Any] = Field(default_factory=dict)
    methods: dict[str, Method] = Field(min_length=1)
    problems: dict[str, ProblemEntry] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    eval_episodes: PositiveInt = Field(
        default=64, description="held-out conversations per run; the same ones for every method of a seed"
    )
    selector: SelectorSpec | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        return seeds

    @field_validator("methods")
    @classmethod
    def _labels_are_folder_names(cls, methods: dict) -> dict:
        bad = [k for k in methods if not k.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"method labels become folder names: use letters, digits, - and _ (got {bad})")
        reserved = sorted({INITIAL, SELECTOR} & set(methods))
        if reserved:
            raise ValueError(f"{reserved} are the rows every problem gets: name the method otherwise")
        return methods

    @model_validator(mode="after")
    def _known_methods(self) -> Suite:
        for name, entry in self.problems.items():
            try:  # a registered name or a plug-in's import path (imported here)
                problem_class(name)
            except ValueError as e:
                raise ValueError(f"problems.{name}: {e}") from None
            unknown = set(entry.methods or []) - set(self.methods)
            if unknown:
                raise ValueError(f"problems.{name}.methods names unknown methods {sorted(unknown)}")
            if entry.target_gain is not None and self.selector is None:
                raise ValueError(f"problems.{name}.target_gain needs the selector's pilot batch (selector:)")
        return self

    def methods_for(self, problem: str) -> list[str]:
        return self.problems[problem].methods or list(self.methods)

    def selector_candidates(self, problem: str) -> list[str]:
        """What the selector chooses among: the problem's policy classes trained online as they are
        (not the baselines: PPO's overrides, offline training)."""
        return [
            m for m in self.methods_for(problem) if not (self.methods[m].offline or self.methods[m].overrides)
        ]

    def rows_for(self, problem: str) -> list[str]:
        """The table's rows for a problem: the initial policy, its methods, the selector."""
        return [INITIAL, *self.methods_for(problem), *([SELECTOR] if self.selector else [])]

    def cells(self) -> list[tuple[str, str, int]]:
        """(problem, method label, seed), problem-major: a problem's rows complete early."""
        return [(p, m, s) for p in self.problems for m in self.methods_for(p) for s in self.seeds]

    def config(self, problem: str, label: str | None, seed: int) -> PPGConfig:
        """The cell's config: defaults <- base <- the problem's overrides <- the method's overrides
        <- problem, seed, the method's policy class."""
        method = self.methods.get(label) if label else None
        overrides = {
            **self.base,
            **self.problems[problem].overrides,
            **(method.overrides if method else {}),
            "problem.name": problem,
            "run.seed": seed,
        }
        config = load_config(None, [f"{k}={_yaml_value(v)}" for k, v in overrides.items()])
        if method is not None:
            objective = config.objective.model_copy(update={"policy_class": method.policy_class})
            config = config.model_copy(update={"objective": objective})
        name = f"{problem}-{label or 'pilot'}-seed{seed}"
        return config.model_copy(update={"run": config.run.model_copy(update={"name": name})})

    def selector_config(self, problem: str, pick: str, seed: int) -> PPGConfig:
        """The selector's own run of its pick: an independent training seed, named as its own row."""
        config = self.config(problem, pick, seed)
        run = config.run.model_copy(
            update={"seed": seed + SELECTOR_SEED_OFFSET, "name": f"{problem}-{SELECTOR}-seed{seed}"}
        )
        return config.model_copy(update={"run": run})

    def extends(self, recorded: dict, defaults: dict[str, Any] | None = None) -> list[str]:
        """What in this suite contradicts ``recorded`` (an earlier suite.json of the same folder):
        a suite may add methods, problems and seeds to a folder, never change what was run.
        ``defaults``: the code's config defaults now (``config_defaults()``); a default that changed
        since the folder's first cells ran (recorded there) is a clash too, unless the suite's base
        pins the old value: cells of one table must not mix two code versions' settings."""
        now = self.model_dump(mode="json")
        clashes = ["eval_episodes"] if recorded.get("eval_episodes") != now["eval_episodes"] else []
        if _with_selector_defaults(recorded.get("selector")) != now["selector"]:
            clashes.append("selector")  # a field added to SelectorSpec since is its default there
        if "defaults" in recorded and defaults is not None:
            before = {**recorded["defaults"], **recorded.get("base", {})}
            after = {**defaults, **now["base"]}
            clashes += [
                f"base.{k}"
                for k in sorted(set(before) | set(after))
                if k in before and before[k] != after.get(k)
            ]
        elif recorded.get("base") != now["base"]:
            clashes.append("base")
        old, new = recorded.get("methods", {}), now["methods"]
        clashes += [f"methods.{k}" for k in set(old) & set(new) if old[k] != new[k]]
        old, new = recorded.get("problems", {}), now["problems"]
        clashes += [f"problems.{k}" for k in set(old) & set(new) if not _extends_problem(old[k], new[k])]
        return sorted(clashes)


def _with_selector_defaults(recorded: dict | None) -> dict | None:
    if recorded is None:
        return None
    return {**SelectorSpec().model_dump(mode="json"), **recorded}


def _extends_problem(old: dict, new: dict) -> bool:
    """The same problem entry, or one whose method list only gained methods (new rows of a table)."""
    rest = lambda entry: {k: v for k, v in entry.items() if k != "methods"}  # noqa: E731
    if rest(old) != rest(new):
        return False
    if old.get("methods") is None or new.get("methods") is None:
        return old.get("methods") == new.get("methods")
    return set(old["methods"]) <= set(new["methods"])


def config_defaults() -> dict[str, Any]:
    """Every setting's default in this code, as dotted keys (what a suite's ``base`` overrides)."""
    return flatten(PPGConfig().model_dump(mode="json"))


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
        for label in suite.methods_for(problem):
            try:
                check_environment(check_trainable(suite.config(problem, label, suite.seeds[0])))
            except ValueError as e:  # ConfigError, ProblemError, PluginError: each names its field
                raise SuiteError(f"{path}: problem {problem!r} x method {label!r}: {e}") from None
    return suite


# The output folder's layout (see ppg/experiment/runner.py): the runner writes it, the report reads it.
def cell_dir(out: Path, problem: str, label: str, seed: int) -> Path:
    return out / "runs" / problem / label / f"seed{seed}"


def pilot_path(out: Path, problem: str, seed: int) -> Path:
    return out / "pilots" / f"{problem}-seed{seed}.json"


def selector_path(out: Path, problem: str, seed: int) -> Path:
    """The selector run's phases: from which iteration it trained which pick, and its pilots' cost."""
    return out / "pilots" / f"{problem}-seed{seed}-selector.json"


def offline_data_path(out: Path, problem: str, seed: int) -> Path:
    """The initial policy's logged conversations that a seed's offline methods train on."""
    return out / "offline" / f"{problem}-seed{seed}.jsonl"


HELDOUT = "heldout.json"  # in a cell folder: its held-out evaluation, the score of the run
