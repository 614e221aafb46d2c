"""The logged-conversation file: judged episodes on disk, what offline PPG trains on.

Offline PPG (``run.offline_data``) trains on conversations that were played and judged once
(``ppg collect``), not on fresh rollouts: each agent turn's log-likelihood is weighted by its advantage
under the configured policy class (G[t] - baseline), without importance weights. So the file keeps
exactly what the learner needs and the judge produced - token ids, the agent mask, per-turn rewards
and segments - and who produced it, so a file is never used with a tokenizer or problem it does not
belong to.

Format (JSON Lines, UTF-8, one JSON object per line)::

    {"format": "ppg-episodes", "version": 1, "problem": "myopic", "model": "embedded:tiny",
     "policy": "initial (embedded:tiny)", "episodes": 2, ...more provenance fields}
    {"problem": "myopic", "persona_id": "p01", "group_id": 0, "policy_version": 0,
     "messages": [{"role": "system", "content": "..."}, ...], "rewards": [0.5, -0.2],
     "segment_ids": [0, 0], "token_ids": [...], "agent_mask": [...], "token_turn": [...]}
    ...

Line 1 is the header: ``model`` is the tokenizer (``model.name_or_path``) whose ids ``token_ids`` are,
``policy`` what played the agent, ``episodes`` how many lines follow; other header fields are free
provenance (seed, judge, ...). Every other line is one ``ppg.episode.Episode`` without its sampler
log-probs (offline training uses none). Episodes sharing a ``group_id`` played the same persona and
conversation seed (the group baseline's "same prompt").

Reading validates every line (pydantic, strict types) and each episode's self-consistency; an error
names the file, the line, the field and the fix. Writing validates the same way and is atomic (a
temporary sibling renamed into place), so a crash never leaves a half file that looks whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from ppg.config import ConfigError, PPGConfig
from ppg.episode import Episode
from ppg.files import atomic_write_text

FORMAT, VERSION = "ppg-episodes", 1
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FIX_HEADER = (
    'the first line must be the header {"format": "ppg-episodes", "version": 1, "problem": ..., '
    '"model": ..., "policy": ..., "episodes": N}; write such files with ppg collect '
    "(or ppg.offline.write_episodes)"
)
FIX_LINE = "correct that line, or write the file again with ppg collect (or ppg.offline.write_episodes)"


class EpisodeFileError(ValueError):
    """A logged-conversation file that cannot be used; the message names file, line, field and fix."""


class EpisodesHeader(BaseModel):
    """Line 1. Unknown fields are kept (``model_extra``): free provenance such as the seed."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    format: Literal["ppg-episodes"]
    version: Literal[1]
    problem: str = Field(min_length=1)
    model: str = Field(min_length=1, description="model.name_or_path whose tokenizer made token_ids")
    policy: str = Field(min_length=1, description="what played the agent: a checkpoint, the initial model")
    episodes: NonNegativeInt


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: str
    content: str


class EpisodeRecord(BaseModel):
    """One episode line: ``ppg.episode.Episode`` without ``logprobs``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    problem: str
    persona_id: str
    group_id: int
    policy_version: NonNegativeInt
    messages: list[Message]
    rewards: list[FiniteFloat] = Field(min_length=1)
    segment_ids: list[NonNegativeInt]
    token_ids: list[NonNegativeInt] = Field(min_length=1)
    agent_mask: list[bool]
    token_turn: list[int]

    def to_episode(self) -> Episode:
        fields = self.model_dump()
        return Episode(**fields)


def inconsistency(record: EpisodeRecord) -> tuple[str, str] | None:
    """(field, problem) for the first way the episode contradicts itself; None when it does not.
    These are the learner's own shape checks (``collate``, ``ppg.loss.check_token_batch``), made
    before training so that they point at a line instead of a tensor."""
    length = len(record.token_ids)
    for name in ("agent_mask", "token_turn"):
        if len(getattr(record, name)) != length:
            return name, f"has {len(getattr(record, name))} entries but token_ids has {length}"
    turns = len(record.rewards)
    if len(record.segment_ids) != turns:
        return "segment_ids", f"has {len(record.segment_ids)} entries but rewards has {turns} (one per turn)"
    if not any(record.agent_mask):
        return "agent_mask", "marks no token as the agent's: the episode has no action to learn from"
    bad = [
        t for t, own in zip(record.token_turn, record.agent_mask, strict=True) if own and not 0 <= t < turns
    ]
    if bad:
        return "token_turn", f"on agent tokens names turn {bad[0]}, outside 0..{turns - 1} ({turns} rewards)"
    if any(b < a for a, b in zip(record.segment_ids, record.segment_ids[1:], strict=False)):
        return "segment_ids", f"{record.segment_ids} must not decrease"
    return None


def _validation_message(error: ValidationError) -> str:
    parts = []
    for err in error.errors()[:3]:
        field = ".".join(str(p) for p in err["loc"]) or "(the whole line)"
        got = err.get("input")
        got_text = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got {got!r})"
        if err["type"] == "extra_forbidden":
            parts.append(f"field '{field}': unknown field")
        else:
            parts.append(f"field '{field}': {err['msg']}{got_text}")
    more = len(error.errors()) - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _record(data: Any, where: str) -> EpisodeRecord:
    try:
        record = EpisodeRecord.model_validate(data)
    except ValidationError as e:
        raise EpisodeFileError(f"{where}: {_validation_message(e)}; {FIX_LINE}") from None
    problem = inconsistency(record)
    if problem is not None:
        raise EpisodeFileError(f"{where}: field '{problem[0]}' {problem[1]}; {FIX_LINE}")
    return record


def episode_fields(episode: Episode) -> dict:
    """An Episode as its file line's fields (logprobs are not stored)."""
    fields = dataclasses.asdict(episode)
    fields.pop("logprobs")
    return fields


def write_episodes(path: str | Path, episodes: list[Episode], header_fields: dict) -> Path:
    """Write ``episodes`` with a header of ``header_fields`` (at least problem, model, policy; more
    are kept as provenance), atomically. Everything is validated first, as ``read_episodes`` would."""
    path = Path(path)
    fields = {k: v for k, v in header_fields.items() if k not in ("format", "version", "episodes")}
    raw_header = {"format": FORMAT, "version": VERSION, **fields, "episodes": len(episodes)}
    try:
        EpisodesHeader.model_validate(raw_header)
    except ValidationError as e:
        raise EpisodeFileError(f"{path}: header: {_validation_message(e)}") from None
    lines = [json.dumps(raw_header, allow_nan=False)]
    for i, episode in enumerate(episodes):
        fields = episode_fields(episode)
        record = _record(fields, f"{path}: episode {i}")
        if record.problem != raw_header["problem"]:
            raise EpisodeFileError(
                f"{path}: episode {i}: field 'problem' is {record.problem!r}, but the file is for "
                f"{raw_header['problem']!r}; one file holds one problem's episodes"
            )
        lines.append(json.dumps(fields, separators=(",", ":"), allow_nan=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_header(path: str | Path) -> EpisodesHeader:
    """Only line 1 (cheap: what a file holds, without reading its episodes)."""
    path = Path(path)
    with _open(path) as f:
        first = f.readline()
    return _header(path, first)


def read_episodes(path: str | Path) -> tuple[EpisodesHeader, list[Episode]]:
    """The header and every episode (``logprobs`` None), each line validated."""
    path = Path(path)
    with _open(path) as f:
        lines = f.read().split("\n")
    header = _header(path, lines[0])
    episodes = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        record = _record(_json(line, where), where)
        if record.problem != header.problem:
            raise EpisodeFileError(
                f"{where}: field 'problem' is {record.problem!r}, but the header says {header.problem!r}; "
                f"one file holds one problem's episodes: {FIX_LINE}"
            )
        episodes.append(record.to_episode())
    if len(episodes) != header.episodes:
        raise EpisodeFileError(
            f"{path}: the header (line 1) says 'episodes': {header.episodes}, but {len(episodes)} episode "
            "lines follow; the file is incomplete or was edited: write it again with ppg collect"
        )
    return header, episodes


def _open(path: Path):
    if not path.is_file():
        raise EpisodeFileError(f"{path} does not exist; write it with ppg collect --out {path}")
    return path.open(encoding="utf-8")


def _json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise EpisodeFileError(
            f"{where} is not valid JSON ({e.msg} at column {e.colno}; truncated?): the file is damaged; "
            "write it again with ppg collect"
        ) from None
    except UnicodeDecodeError as e:  # pragma: no cover - read as text already
        raise EpisodeFileError(f"{where} is not UTF-8 ({e.reason})") from None


def _header(path: Path, line: str) -> EpisodesHeader:
    where = f"{path}, line 1 (header)"
    if not line.strip():
        raise EpisodeFileError(f"{where} is empty; {FIX_HEADER}")
    data = _json(line, where)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EpisodeFileError(f"{where}: field 'format' is {got!r}, not {FORMAT!r}; {FIX_HEADER}")
    if data.get("version") != VERSION:
        raise EpisodeFileError(
            f"{where}: field 'version' is {data.get('version')!r}; this ppg reads version {VERSION} only "
            "(write the file again with this version's ppg collect)"
        )
    try:
        return EpisodesHeader.model_validate(data)
    except ValidationError as e:
        raise EpisodeFileError(f"{where}: {_validation_message(e)}; {FIX_HEADER}") from None


# --- as training data --------------------------------------------------------------------------------


def episode_groups(episodes: list[Episode]) -> list[list[Episode]]:
    """Episodes by ``group_id``, groups in order of first appearance (the unit offline batches sample)."""
    groups: dict[int, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.group_id, []).append(e)
    return list(groups.values())


def check_offline_data(config: PPGConfig) -> PPGConfig:
    """Refuse ``run.offline_data`` that cannot train this config, before anything starts: the file
    must read cleanly, hold this problem's episodes tokenized by this model, in groups of
    ``rollout.group_size``, at least ``rollout.episodes_per_iteration`` of them. Returns the config
    with the path made absolute (the learner runs elsewhere, a resume may start elsewhere)."""
    path = config.run.offline_data
    if path is None:
        return config
    path = Path(path).expanduser().resolve()
    name = f"run.offline_data={config.run.offline_data}"
    try:
        header, episodes = read_episodes(path)
    except EpisodeFileError as e:
        raise ConfigError(f"{name}: {e}") from None
    problems = []
    if header.problem != config.problem.name:
        problems.append(
            f"holds episodes of problem {header.problem!r}, but problem.name={config.problem.name}: set "
            f"problem.name={header.problem}, or collect {config.problem.name} episodes "
            f"(ppg collect problem.name={config.problem.name} --out FILE)"
        )
    if header.model != config.model.name_or_path:
        problems.append(
            f"its token ids come from model {header.model!r}, but model.name_or_path="
            f"{config.model.name_or_path}: set model.name_or_path={header.model}, or collect with this model"
        )
    r = config.rollout
    sizes = Counter(len(g) for g in episode_groups(episodes))
    if set(sizes) != {r.group_size}:
        problems.append(
            f"its groups have {dict(sorted(sizes.items()))} episodes (size: count), but rollout.group_size="
            f"{r.group_size}: batches take whole groups, so set rollout.group_size to the file's group size"
        )
    if r.episodes_per_iteration > len(episodes):
        problems.append(
            f"holds {len(episodes)} episodes, fewer than rollout.episodes_per_iteration="
            f"{r.episodes_per_iteration}: lower it, or collect more (ppg collect --episodes N)"
        )
    if problems:
        raise ConfigError(f"{name} cannot train this config:\n  " + "\n  ".join(problems))
    return config.model_copy(update={"run": config.run.model_copy(update={"offline_data": path})})
