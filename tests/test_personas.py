"""The persona catalogue and user persona files: schema, determinism, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppg.env.personas import SHIPPED_PERSONAS, Persona, PersonaError, load_personas, split_personas

REPO = Path(__file__).resolve().parents[1]


def test_shipped_catalogue_has_50_plus_complete_personas():
    personas = load_personas()
    assert len(personas) >= 50
    assert len({p.id for p in personas}) == len(personas)
    for p in personas:
        assert p.traits and len(p.preferences) == 5 and len(p.dislikes) == 5 and len(p.facts) == 4
    assert {p.style.brevity for p in personas} == {"terse", "brief", "chatty"}
    assert {p.setting for p in personas} == {"chitchat", "patient", "student"}


def test_catalogue_is_regenerated_identically_from_its_seed(tmp_path):
    out = tmp_path / "personas.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "generate_personas.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert out.read_bytes() == SHIPPED_PERSONAS.read_bytes()


def test_split_is_stable_and_disjoint():
    train, held = split_personas(load_personas())
    assert len(held) == len(load_personas()) // 5
    assert not {p.id for p in train} & {p.id for p in held}
    assert split_personas(list(reversed(load_personas())))[1] == held


def test_user_files_in_jsonl_and_yaml(tmp_path):
    records = [p.model_dump(mode="json") for p in load_personas()[:3]]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    yml = tmp_path / "mine.yaml"
    yml.write_text(yaml.safe_dump(records))
    assert load_personas(jsonl) == load_personas(yml) == load_personas()[:3]


def good_record() -> dict:
    return load_personas()[0].model_dump(mode="json")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["preferences"].update(music="pizza"), "preferences.music: 'pizza' is not a music item"),
        (lambda r: r["preferences"].update(sports="chess"), "unknown category 'sports'"),
        (lambda r: r["facts"].update(city="atlantis"), "facts.city: 'atlantis' is not allowed"),
        (lambda r: r["dislikes"].update(music=r["preferences"]["music"]), "both a preference and a dislike"),
        (lambda r: r["style"].update(brevity="long"), "style.brevity"),
        (lambda r: r.update(mood="happy"), "mood: Extra inputs are not permitted"),
        (lambda r: r.pop("name"), "name: Field required"),
        (lambda r: r.update(id="has space"), "id: String should match pattern"),
    ],
)
def test_invalid_persona_names_file_line_and_field(tmp_path, mutate, message):
    records = [good_record(), good_record()]
    records[1]["id"] = "other"
    mutate(records[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(PersonaError) as info:
        load_personas(path)
    assert "line 2" in str(info.value) and message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", "{not json\n", "line 1: not valid JSON"),
        ("a.yaml", "id: p1\n", "must hold a list"),
        ("a.yaml", "[1, 2\n", "not valid YAML"),
        ("a.txt", "[]", "must end in .jsonl, .yaml or .yml"),
        ("a.jsonl", "\n\n", "holds no personas"),
    ],
)
def test_unreadable_persona_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PersonaError, match=message):
        load_personas(path)


def test_missing_and_duplicate(tmp_path):
    with pytest.raises(PersonaError, match="does not exist"):
        load_personas(tmp_path / "nope.jsonl")
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(good_record()) + "\n" + json.dumps(good_record()) + "\n")
    with pytest.raises(PersonaError, match="line 2: duplicate persona id 'p000' \\(first at line 1\\)"):
        load_personas(path)


def test_persona_description_mentions_everything():
    p: Persona = load_personas()[0]
    text = p.describe()
    for value in [*p.preferences.values(), *p.dislikes.values(), *p.facts.values(), p.name]:
        assert value in text
