"""Settings of one ``ppg serve`` application: the config tree's ``serve:`` section plus what a replica
needs beyond it (the checkpoint, the engine's context length and dtype). One flat model, because it is
also the ``args`` of the Serve config file (``deploy/serve_config.yaml``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import ConfigDict, Field, PositiveInt

from ppg.config import Autoscaling, PPGConfig, ProblemConfig, ServeConfig

API_KEY_ENV = "PPG_SERVE_API_KEY"
__all__ = ["Autoscaling", "ServeSettings"]


class ServeSettings(ServeConfig):
    """``serve:`` of the config tree, plus the checkpoint and the engine settings a replica needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="checkpoint folder (RUN/checkpoints/iter_N) or a policy folder")
    policy_version: int | None = Field(
        default=None, ge=0, description="version served at start; None = the checkpoint's state.json, else 0"
    )
    # from ModelConfig / RolloutConfig (the engine)
    max_model_len: PositiveInt = 1024
    dtype: str = "float32"
    kv_cache_gib: float | None = Field(default=None, ge=0, description="as rollout.kv_cache_gib")
    trust_remote_code: bool = False
    seed: int = 0
    # the chat page (/) and the training page (/live): ppg/serve/ui.py
    problem: ProblemConfig = Field(
        default_factory=ProblemConfig,
        description="the problem whose personas the chat page offers and whose judge scores its replies",
    )
    run_dir: str | None = Field(
        default=None, description="a run folder whose metrics and samples /live shows (ppg train sets it)"
    )

    @classmethod
    def from_config(cls, config: PPGConfig, checkpoint: str | Path, **extra) -> ServeSettings:
        m = config.model
        fields = config.serve.model_dump()
        fields.update(
            checkpoint=str(checkpoint),
            max_model_len=m.max_model_len,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            kv_cache_gib=config.rollout.kv_cache_gib,
            seed=config.run.seed,
            problem=config.problem.model_dump(mode="json"),
        )
        fields.update(extra)
        return cls.model_validate(fields)

    def initial_version(self, policy_dir: Path) -> int:
        """The version to report at start: explicit, else the checkpoint's ``state.json``, else 0."""
        if self.policy_version is not None:
            return self.policy_version
        for state in (policy_dir.parent / "state.json", policy_dir / "state.json"):
            if state.is_file():
                try:
                    return int(json.loads(state.read_text())["policy_version"])
                except (ValueError, KeyError, TypeError):
                    break
        return 0

    def api_key(self) -> str | None:
        """The bearer token, read in the replica (never logged, never part of the deployment config)."""
        token = os.environ.get(self.api_key_env, "").strip()
        if not token and self.api_key_file:
            token = Path(self.api_key_file).expanduser().read_text().strip()
        return token or None
