"""Settings of one ``ppg serve`` application: ``ServeConfig`` (the config tree) plus what the app needs
beyond it (context length, bounds, auth, batching, reload polling).

Fields marked "candidate for ServeConfig" would move into ``ppg/config.py``; until then they take
these defaults and can be set through the Serve config file's ``args`` or ``ServeSettings`` itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from ppg.config import PPGConfig

API_KEY_ENV = "PPG_SERVE_API_KEY"


class Autoscaling(BaseModel):
    """Ray Serve autoscaling; replaces ``num_replicas`` when given."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 16.0

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(description="checkpoint folder (RUN/checkpoints/iter_N) or a policy folder")
    policy_version: int | None = Field(
        default=None, ge=0, description="version served at start; None = the checkpoint's state.json, else 0"
    )
    # from ServeConfig
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: PositiveInt = 1
    max_tokens_limit: PositiveInt = 256
    # candidates for ServeConfig
    app_name: str = Field(default="ppg", min_length=1, description="Serve application name (ppg serve)")
    model_name: str = Field(default="ppg-policy", min_length=1, description="served id: <name>-v<version>")
    max_n: PositiveInt = Field(default=4, description="largest n (choices per request)")
    autoscaling: Autoscaling | None = None
    num_cpus_per_replica: float = Field(default=1.0, ge=0)
    num_gpus_per_replica: float = Field(default=0.0, ge=0)
    max_ongoing_requests: PositiveInt = Field(default=64, description="per replica; the rest queue")
    max_batch_size: PositiveInt = Field(default=32, description="concurrent requests fused into one generate")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    reload_poll_s: PositiveFloat = Field(
        default=1.0, description="how often a replica checks for a newer version"
    )
    api_key_env: str = Field(default=API_KEY_ENV, description="env var holding the bearer token")
    api_key_file: str | None = Field(default=None, description="file holding the bearer token")
    # from ModelConfig / RolloutConfig (the engine)
    max_model_len: PositiveInt = 1024
    dtype: str = "float32"
    kv_cache_gib: float = Field(default=1.0, ge=0)
    trust_remote_code: bool = False
    seed: int = 0

    @classmethod
    def from_config(cls, config: PPGConfig, checkpoint: str | Path, **extra) -> ServeSettings:
        s, m = config.serve, config.model
        return cls(
            checkpoint=str(checkpoint),
            host=s.host,
            port=s.port,
            num_replicas=s.num_replicas,
            max_tokens_limit=s.max_tokens_limit,
            max_model_len=m.max_model_len,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            kv_cache_gib=config.rollout.kv_cache_gib,
            seed=config.run.seed,
            **extra,
        )

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
