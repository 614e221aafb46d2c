"""Turn an LLM judge's free-text reply into an integer score, or fail loudly.

A judge that silently maps an unparseable reply to 0 poisons the per-turn rewards that the partial
policy gradient credits turn by turn, so every doubtful case raises `JudgeParseError` instead: no score,
two different scores, a non-integer, a score outside ``[low, high]``, or a fraction on another scale.

Scores are found by a few explicit patterns, all of which must agree:
``7/10`` and ``7 out of 10``; a label (``Score: 7``, ``score=7``, ``**Rating:** 7``, ``Score is 7``);
a verb (``I'd give it a 7``, ``I rate it 7``); a bold number (``**7**``); or a reply that is only a number.
"""

from __future__ import annotations

import re

__all__ = ["JudgeParseError", "parse_score"]

_NUM = r"(?P<num>-?\d+(?:\.\d+)?)"
# A number not glued to a letter, digit or decimal point on its left, nor to a digit on its right.
_FREE_NUM = r"(?<![\w.])" + _NUM + r"(?!\.?\d)"

_FRACTION = re.compile(_FREE_NUM + r"\s*(?:/|\bout\s+of\b)\s*(?P<den>\d+)\b", re.IGNORECASE)
_LABELED = re.compile(
    r"\b(?:score|rating|grade)s?\b"  # the label
    r"\W{0,8}?(?:(?:is|of|was|would\s+be|will\s+be)\b\W{0,6}?)?"  # ': ', '** ', '=', ' is '
    + _NUM
    + r"(?:\s*(?:-|–|to)\s*(?P<upper>\d+))?",  # a range such as '7-8' is two scores
    re.IGNORECASE,
)
_VERB = re.compile(
    r"\b(?:rate|rated|rating|give|gives|giving|gave|award|awarded|assign|assigned)\b"
    r"[^\d\n]{0,25}?" + _FREE_NUM,
    re.IGNORECASE,
)
_BOLD = re.compile(r"\*\*\s*" + _NUM + r"\s*\*\*")
_BARE = re.compile(r"^[\s*#(\[]*" + _NUM + r"[\s*.!)\]]*$")

_SHOWN = 200  # characters of the offending reply kept in the error message


class JudgeParseError(ValueError):
    """The judge's reply has no single, valid integer score; ``text`` holds the (truncated) reply."""

    def __init__(self, reason: str, text: str) -> None:
        shown = text if len(text) <= _SHOWN else text[:_SHOWN] + "...[truncated]"
        super().__init__(f"{reason} in judge reply {shown!r}")
        self.reason = reason
        self.text = shown


def _as_int(raw: str, text: str) -> int:
    value = float(raw)
    if not value.is_integer():
        raise JudgeParseError(f"non-integer score {raw}", text)
    return int(value)


def _candidates(text: str, high: int) -> list[int]:
    """Every score the explicit patterns see, in order (duplicates kept)."""
    found: list[int] = []
    for m in _FRACTION.finditer(text):
        if int(m["den"]) != high:
            raise JudgeParseError(f"score {m.group(0)!r} is not on the 0..{high} scale asked for", text)
        found.append(_as_int(m["num"], text))
    for m in _LABELED.finditer(text):
        found.append(_as_int(m["num"], text))
        if m["upper"] is not None:
            found.append(int(m["upper"]))
    for pattern in (_VERB, _BOLD):
        found.extend(_as_int(m["num"], text) for m in pattern.finditer(text))
    if not found and (m := _BARE.match(text)):
        found.append(_as_int(m["num"], text))
    return found


def parse_score(text: str, low: int = 0, high: int = 10) -> int:
    """Return the single integer score in ``[low, high]`` that ``text`` states.

    Raises `JudgeParseError` (a `ValueError`) when there is no score, when the reply states different
    scores, or when the score is fractional, out of range, or written on another scale (``4/5``).
    """
    if low > high:
        raise ValueError(f"parse_score: low={low} > high={high}")
    found = _candidates(text, high)
    if not found:
        raise JudgeParseError("no score found", text)
    distinct = sorted(set(found))
    if len(distinct) > 1:
        raise JudgeParseError(f"conflicting scores {distinct}", text)
    score = distinct[0]
    if not low <= score <= high:
        raise JudgeParseError(f"score {score} outside [{low}, {high}]", text)
    return score
