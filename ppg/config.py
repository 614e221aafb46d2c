"""One configuration tree for every command: YAML file + ``key.sub=value`` overrides -> validated models.

Every section forbids unknown keys, so a typo fails loudly with its path instead of being ignored.
Variants (policy class, baseline) are picked with ``type:`` and validated as discriminated unions.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ppg.objectives import Baseline, Greedy, GroupMean, Objective, PolicyClass

EMBEDDED_MODEL = "embedded:tiny"
BUILTIN_JUDGES = ("rule", "embedding", "llm")
BUILTIN_PARTNERS = ("scripted", "llm")
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_import_path(name: str) -> bool:
    """A plug-in is named ``pkg.module:attr``; no built-in name has a ':' (ppg/env/plugins.py)."""
    return ":" in name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The policy: the embedded tiny model by default, or any Hugging Face causal LM path / hub name."""

    name_or_path: str = Field(
        default=EMBEDDED_MODEL,
        description=f"'{EMBEDDED_MODEL}' (built locally, offline), a local HF folder, or a hub name",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: PositiveInt = Field(default=1024, description="context length in tokens")
    trust_remote_code: bool = Field(
        default=False, description="run code shipped with the model; off for safety"
    )


class ProblemConfig(Section):
    """Which persona-alignment problem to train on, who plays the user and who judges. Each of
    ``name``, ``judge`` and ``partner`` is a built-in name or a plug-in's import path
    ``pkg.module:attr``; only the syntax is checked here (this module imports nothing of ppg.env),
    the import and the interface by ``ppg.env.factory.check_environment`` before a run starts."""

    name: str = Field(
        default="myopic",
        min_length=1,
        description="a registered problem (ppg problems) or pkg.module:Class, a ppg.env.problems.Problem subclass",
    )
    num_turns: PositiveInt | None = Field(
        default=None, description="agent turns per conversation; None = the problem's own"
    )
    segment_boundaries: list[int] | None = Field(
        default=None, description="turns where a new segment starts; None = the problem's own"
    )
    reward_scale: float = Field(default=1.0, gt=0)
    personas_file: Path | None = Field(
        default=None, description="JSONL/YAML persona file; None = shipped set"
    )
    judge: str = Field(
        default="rule",
        description="who scores each turn: rule, embedding, llm, or pkg.module:name (a judge class or factory)",
    )
    partner: str = Field(
        default="scripted",
        description="who plays the other side: scripted, llm, or pkg.module:name (a partner class or factory)",
    )
    partner_model: str | None = Field(
        default=None, description="HF model for partner/judge 'llm'; None = model.name_or_path"
    )

    @field_validator("name", "judge", "partner")
    @classmethod
    def _builtin_or_import_path(cls, value: str, info: ValidationInfo) -> str:
        builtins = {"judge": BUILTIN_JUDGES, "partner": BUILTIN_PARTNERS}.get(info.field_name or "")
        if is_import_path(value):
            if not _IMPORT_PATH.fullmatch(value):
                raise ValueError(
                    f"{value!r} is not an import path: write pkg.module:Name (a dotted module, ':', "
                    "the class or function in it)"
                )
        elif builtins is not None and value not in builtins:
            raise ValueError(
                f"unknown {info.field_name} {value!r}: use {', '.join(builtins)}, or your own as "
                "pkg.module:name (README: plug-ins)"
            )
        return value

    @property
    def uses_llm(self) -> bool:
        """The partner or the judge is the built-in LLM one: a shared vLLM chat actor must run for the
        workers. A plug-in never is: it is built without arguments, so it cannot be handed the actor."""
        return "llm" in (self.partner, self.judge)

    @model_validator(mode="after")
    def _boundaries_inside(self) -> ProblemConfig:
        b = self.segment_boundaries
        if b is not None:
            if self.num_turns is not None and any(not 0 < s < self.num_turns for s in b):
                raise ValueError(
                    f"segment_boundaries {b} must lie in 1..{self.num_turns - 1} (num_turns={self.num_turns})"
                )
            if any(x >= y for x, y in zip(b, b[1:], strict=False)):
                raise ValueError(f"segment_boundaries {b} must be strictly increasing")
        return self


class RolloutConfig(Section):
    engine: Literal["vllm", "hf"] = Field(
        default="vllm", description="vllm (production) or hf (transformers reference)"
    )
    num_workers: PositiveInt = Field(default=1, description="vLLM rollout actors; resizable during a run")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per rollout worker, e.g. {ppg_rollout: 1} to place workers "
        "on a cluster's rollout node group (cluster/README.md)",
    )
    episodes_per_iteration: PositiveInt = 32
    group_size: PositiveInt = Field(default=4, description="conversations per persona (group baseline)")
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens_per_turn: PositiveInt = 32
    kv_cache_gib: float | None = Field(
        default=None,
        ge=0,
        description="vLLM KV cache per engine (rollout workers, serve replicas, the LLM partner), in "
        "GiB; None = room for 64 sequences of model.max_model_len tokens of this model (the embedded "
        "tiny model: 0.125); 0 = vLLM decides (GPU)",
    )
    requests_per_worker: PositiveInt = Field(
        default=2, description="an iteration's groups are split into this many requests per worker"
    )

    @model_validator(mode="after")
    def _groups_divide_batch(self) -> RolloutConfig:
        if self.episodes_per_iteration % self.group_size:
            raise ValueError(
                f"episodes_per_iteration ({self.episodes_per_iteration}) must be a multiple of "
                f"group_size ({self.group_size})"
            )
        return self


class LoraSettings(Section):
    """Train low-rank adapters instead of every weight (peft). Rollout workers, checkpoints and
    serving still see one plain model: the adapters merged into the base weights."""

    rank: PositiveInt = Field(default=8, description="adapter rank r")
    alpha: float = Field(default=16.0, gt=0, description="scaling: the update is (alpha / rank) * B @ A")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="module names to adapt (e.g. [q_proj, v_proj]) or all-linear (every linear layer "
        "but the output head)",
    )

    @model_validator(mode="after")
    def _peft_installed(self) -> LoraSettings:
        if importlib.util.find_spec("peft") is None:
            raise ValueError("peft is not installed: pip install 'ppg[lora]' (or drop learner.lora)")
        return self


class LearnerConfig(Section):
    num_workers: PositiveInt = Field(default=1, description="Ray Train (DDP) workers")
    use_gpu: bool = False
    gpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="GPU share per learner worker with use_gpu (0.5: share a GPU with rollout)",
    )
    cpus_per_worker: float = Field(default=1.0, gt=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per learner worker, e.g. {ppg_learner: 1} for the learner "
        "node group (cluster/README.md)",
    )
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    loss_reduction: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    micro_batch_size: PositiveInt | None = Field(
        default=None,
        description="episodes per forward/backward; gradients accumulate over a rank's shard "
        "(exactly the same update, less activation memory); unset = the whole shard at once",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: forward under bf16 autocast (weights and optimizer stay fp32)"
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in the backward pass: memory for time"
    )
    lora: LoraSettings | None = Field(
        default=None,
        description="train LoRA adapters (peft) instead of every weight; unset: full fine-tuning",
    )
    algorithm: Literal["pg", "ppo"] = Field(
        default="pg",
        description="pg: one partial policy gradient step per batch; ppo: the PPO baseline - the "
        "clipped ratio objective, learner.ppo_epochs steps per batch",
    )
    ppo_epochs: PositiveInt = Field(default=4, description="optimizer steps per batch with algorithm=ppo")
    ppo_clip: float = Field(default=0.2, gt=0, lt=1, description="PPO's ratio clip epsilon")
    kl_coef: float = Field(default=0.0, ge=0, description="KL penalty to the initial policy")
    max_staleness: int = Field(
        default=1,
        ge=0,
        description="policy versions an episode may lag (1: the next batch is sampled while this "
        "one trains, see run.async_rollouts); 0 = strictly on-policy, no overlap",
    )
    off_policy: Literal["reject", "importance"] = Field(
        default="importance",
        description="episodes within max_staleness but not on-policy: importance-weight them, or drop them",
    )
    importance_clip: float = Field(default=2.0, gt=0, description="truncation of importance weights")
    importance_ratio: Literal["sequence", "token"] = Field(
        default="sequence",
        description="sequence: each stale episode weighted by pi/mu of all its agent tokens (exact "
        "before truncation, any policy class); token: each token by its own ratio (biased beyond one token)",
    )


class Autoscaling(Section):
    """Ray Serve autoscaling; replaces ``serve.num_replicas`` when given."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: float = Field(default=16.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Section):
    """The HTTP policy server (``ppg serve``, or live during ``ppg train`` with ``enabled``)."""

    enabled: bool = Field(default=False, description="serve the live policy while ppg train runs")
    after_training: Literal["stop", "keep"] = Field(
        default="stop", description="when ppg train ends: stop the server, or keep serving until Ctrl-C"
    )
    host: str = Field(default="127.0.0.1", description="bind address; loopback unless you mean otherwise")
    port: int = Field(default=8000, ge=1, le=65535)
    ingress: Literal["haproxy", "proxy"] = Field(
        default="haproxy",
        description="how HTTP reaches the replicas on the local cluster ppg starts: HAProxy (Serve's "
        "direct ingress, ~2x the requests/s on 2 cores) or Ray Serve's Python proxy (ppg/serve/ingress.py)",
    )
    app_name: str = Field(default="ppg", min_length=1, description="Ray Serve application name")
    model_name: str = Field(default="ppg-policy", min_length=1, description="served id: <name>-v<version>")
    num_replicas: PositiveInt = 1
    autoscaling: Autoscaling | None = None
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    num_gpus_per_replica: float = Field(default=0.0, ge=0)
    max_tokens_limit: PositiveInt = Field(default=256, description="largest max_tokens a request may ask")
    max_n: PositiveInt = Field(default=4, description="largest n (choices per request)")
    max_ongoing_requests: PositiveInt = Field(default=64, description="per replica; the rest queue")
    max_batch_size: PositiveInt = Field(
        default=32, description="sequences (n per request) the engine runs at once; more wait their turn"
    )
    batch_wait_timeout_s: float = Field(
        default=0.005,
        ge=0,
        description="an idle engine's wait before its first step, so requests "
        "arriving together are prefilled together (later ones join the running batch at any step)",
    )
    reload_poll_s: float = Field(
        default=1.0, gt=0, description="how often a replica checks for a newer policy"
    )
    api_key_env: str = Field(
        default="PPG_SERVE_API_KEY", description="env var holding the bearer token (unset = no auth)"
    )
    api_key_file: str | None = Field(default=None, description="file holding the bearer token")


Logger = Literal["tensorboard", "wandb", "mlflow"]
# run.loggers: the module each logger imports, and how to get it when it is missing.
LOGGER_MODULES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX (a dependency of ppg)"),
    "wandb": ("wandb", "pip install 'ppg[wandb]'"),
    "mlflow": ("mlflow", "pip install 'ppg[mlflow]'"),
}


class RunConfig(Section):
    name: str = Field(default="default", min_length=1)
    output_dir: Path = Path("runs")
    seed: int = 0
    iterations: PositiveInt = 60
    checkpoint_every: PositiveInt = 10
    keep_last: PositiveInt = 3
    max_failures: int = Field(
        default=3,
        ge=0,
        description="learner worker failures survived per run: Ray Train restarts the learner, which "
        "continues exactly from the last checkpoint (run.checkpoint_every bounds the lost work)",
    )
    async_rollouts: bool | None = Field(
        default=None,
        description="overlap the next iteration's rollouts with the update (its episodes are one "
        "version old, importance-weighted); None = wherever the learner accepts that: "
        "learner.max_staleness >= 1, off_policy=importance, algorithm=pg, online",
    )
    sample_every: int = Field(
        default=10,
        ge=0,
        description="write a few of the batch's conversations (with per-turn rewards) to "
        "samples/iter_N.md and TensorBoard every this many iterations; 0 = off",
    )
    offline_data: Path | None = Field(
        default=None,
        description="offline PPG: a ppg-episodes file (ppg collect) whose logged, judged episodes "
        "replace the rollouts: each iteration trains on rollout.episodes_per_iteration of them (whole "
        "groups, drawn from run.seed and the iteration), each turn's log-likelihood weighted by its "
        "advantage without importance weights (see run.offline_weighting); weights still go to the "
        "rollout pool (final evaluation, serving). None = online",
    )
    offline_weighting: Literal["positive", "advantage"] = Field(
        default="positive",
        description="offline PPG's turn weights: positive = max(advantage, 0), a filtered reward-"
        "weighted likelihood that reinforces better-than-baseline turns and never pushes a logged "
        "turn's likelihood down, so the policy cannot drift off the data; advantage = the advantage "
        "itself, the on-policy gradient's form, whose negative weights push logged turns down without "
        "bound (measured: the policy falls below the data's own policy unless learner.kl_coef holds it)",
    )
    final_eval_episodes: int = Field(
        default=64,
        ge=0,
        description="at the end of ppg train: held-out episodes for the final vs initial policy "
        "(paired, into eval/); 0 = skip",
    )
    loggers: list[Logger] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where the learner's metrics and sample dialogues go besides metrics.jsonl and "
        "samples/: tensorboard (<run_dir>/tensorboard), wandb (pip install 'ppg[wandb]'; "
        "WANDB_MODE=offline writes <run_dir>/wandb), mlflow (pip install 'ppg[mlflow]'; "
        "MLFLOW_TRACKING_URI, else <run_dir>/mlflow.db); [] = only the files",
    )
    dashboard: bool = Field(
        default=False,
        description="start the Ray dashboard on 127.0.0.1 with a local cluster (its URL is printed); "
        "a cluster joined through RAY_ADDRESS keeps its own",
    )


class PPGConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    problem: ProblemConfig = Field(default_factory=ProblemConfig)
    # The main job's default: greedy credit with a group (RLOO) baseline, which the myopic problem favours.
    objective: Objective = Field(
        default_factory=lambda: Objective(policy_class=Greedy(), baseline=GroupMean())
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @property
    def overlaps_rollouts(self) -> bool:
        """Whether the next iteration's rollouts run during this update (``run.async_rollouts``
        resolved). By default wherever the staleness bound allows it: generation and learning then
        share the wall clock (BENCHMARKS.md, ppg vs TRL), at one version of lag that the sequence
        importance weights correct exactly (tests/test_loss.py) and that resume repeats exactly."""
        if self.run.async_rollouts is not None:
            return self.run.async_rollouts
        learner = self.learner
        return (
            learner.max_staleness >= 1
            and learner.off_policy == "importance"
            and learner.algorithm == "pg"
            and self.run.offline_data is None
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A config that cannot be used; the message names each bad field path and what it accepts."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"run": {"seed": 0}}`` -> ``{"run.seed": 0}``: the dotted keys of overrides (trackers' parameters, a suite's recorded defaults)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_trainable(config: PPGConfig) -> PPGConfig:
    """Combinations that validate field by field but cannot train correctly; refused before any
    process starts (``ppg train``, every cell of ``ppg experiment``). ``ppg eval`` and ``ppg serve``
    may sample at any temperature: only training needs the sampler and the learner to agree."""
    problems = []
    r, learner = config.rollout, config.learner
    if config.run.async_rollouts and (learner.max_staleness < 1 or learner.off_policy == "reject"):
        # only an explicit true can clash: the default (None) turns the overlap off by itself
        problems.append(
            "run.async_rollouts=true samples each batch one policy version behind the learner, so "
            f"learner.max_staleness={learner.max_staleness} / learner.off_policy={learner.off_policy} "
            "would drop every batch: set learner.max_staleness=1 and learner.off_policy=importance, "
            "or run.async_rollouts=false"
        )
    if r.temperature != 1.0 or r.top_p != 1.0:
        problems.append(
            f"rollout.temperature={r.temperature} / rollout.top_p={r.top_p}: the learner scores "
            "replies under the model's own distribution (temperature 1, no truncation), so training "
            "samples must come from it too; set rollout.temperature=1 and rollout.top_p=1 (sample "
            "otherwise in ppg eval or ppg serve)"
        )
    if learner.algorithm == "ppo" and config.run.async_rollouts:
        problems.append(
            "learner.algorithm=ppo takes its ratio against the learner's own weights before the "
            "batch's first step, so its episodes must be on-policy: set run.async_rollouts=false"
        )
    problems += missing_loggers(config.run.loggers)
    if problems:
        raise ConfigError("config cannot train:\n  " + "\n  ".join(problems))
    return config


def missing_loggers(loggers: list[str]) -> list[str]:
    """One line per chosen logger whose package is not installed here: found before any process
    starts, not as an ImportError in the learner after the rollout engines came up."""
    out = []
    for name in dict.fromkeys(loggers):
        module, install = LOGGER_MODULES[name]
        if importlib.util.find_spec(module) is None:
            out.append(
                f"run.loggers: {name} needs the {module} package, which is not installed: "
                f"{install}, or drop {name} from run.loggers"
            )
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PPGConfig:
    """Defaults <- YAML file <- ``a.b.c=value`` overrides (values parsed as YAML scalars)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    for override in overrides or []:
        raw = apply_override(raw, override)
    try:
        return PPGConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path) if path else "config")) from None


class _YamlLoader(yaml.SafeLoader):
    """YAML without implicit timestamps: no config field is a date, and ``run.name=2024-01-01`` must
    stay the string it was written as."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (pass an existing YAML file to --config)")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (model:, objective:, ...), got {type(data).__name__}"
        )
    return data


def apply_override(raw: dict[str, Any], override: str) -> dict[str, Any]:
    """Set one dotted key. Setting a ``type`` starts that sub-tree afresh: a new variant must not
    inherit the old one's fields (k_step's ``k`` makes no sense for greedy)."""
    key, sep, value_text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {override!r} must look like section.field=value, e.g. objective.gamma=0.9"
        )
    try:
        value = parse_yaml(value_text) if value_text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None
    out = copy.deepcopy(raw)
    *parents, leaf = key.split(".")
    node = out
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parents[: i + 1])} is a value, not a section"
            )
        node = child
    if leaf == "type" and node.get("type") != value:
        node.clear()
    node[leaf] = value
    return out


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    lines = [f"invalid {source}:"]
    for err in error.errors():
        path = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(top level)"
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key; remove it or check its spelling{got_text}")
        else:
            lines.append(f"  {path}: {err['msg'].removeprefix('Value error, ')}{got_text}")
    lines.append("Fix the file or override (e.g. ppg config show --config FILE objective.gamma=0.9).")
    return "\n".join(lines)


def _is_union_tag(part: object) -> bool:
    # pydantic puts the chosen variant's tag in the location ("objective.policy_class.k_step.k"); the
    # user wrote "objective.policy_class.k", so drop it.
    return isinstance(part, str) and part in _UNION_TAGS


_UNION_TAGS = {
    variant.model_fields["type"].default
    for union in (PolicyClass, Baseline)
    for variant in get_args(get_args(union)[0])
}
