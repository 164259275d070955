"""Harder retrieval than one pass key, in the style of RULER (written here, not RULER's code or
templates): several keys hidden in a long text, and variable tracking through chains of
assignments.

Tasks (``eval/accuracy.py --tasks multikey vartrack``, ``eval/frontier.py``):

- ``multikey``: ``num_keys`` sentences "The secret number of NAME is NNNNNNN." hidden at
  random depths of the text (one per name, the other names are distractors); the question
  asks for one name's number (the asked key's depth is set per sample, like the pass key's).
  Score 1 when the first 7-digit number generated is the asked one, else 0.
- ``vartrack``: a chain "VAR X1 = 12345." "VAR X2 = VAR X1." ... (``hops`` links) and
  ``chains - 1`` distractor chains of other values, their statements interleaved at random
  depths (each chain in order); the question asks which variables hold the first chain's
  value. Score: the share of that chain's ``hops + 1`` names present (as whole words) in
  the generated text; a distractor name generated costs nothing (as in RULER's recall).

Pure functions of ``(tokenizer, text, L, seed, index)``: deterministic; the tokenizer only
needs ``encode`` and ``decode`` (eval/needle.py). Every prompt is at most ``L`` tokens.
"""

from __future__ import annotations

import random
import re
import string
from typing import NamedTuple

from eval.needle import _encode, _sentence_ends

__all__ = [
    "Sample",
    "TASKS",
    "make_multikey",
    "make_vartrack",
    "score_multikey",
    "score_vartrack",
    "insert_pieces",
]

MK_PREFIX = (
    "Several secret numbers are hidden in the text below, each one belonging to a name. "
    "Remember every name and its number: a question about one of them follows.\n\n"
)
MK_KEY = " The secret number of {name} is {value}."
MK_QUESTION = "\n\nWhat is the secret number of {name}? The secret number of {name} is"

VT_PREFIX = (
    "The text below hides a few variable assignments. Keep track of them: a question about "
    "them follows.\n\n"
)
VT_VALUE = " VAR {name} = {value}."
VT_LINK = " VAR {name} = VAR {prev}."
VT_QUESTION = (
    "\n\nQuestion: which variables hold the value {value}, assigned directly or through "
    "other variables? Answer: the variables holding {value} are"
)

_COLOURS = ["amber", "azure", "coral", "crimson", "golden", "indigo", "ivory", "jade", "olive"]
_THINGS = ["falcon", "harbor", "lantern", "maple", "meadow", "otter", "quartz", "willow", "zebra"]


class Sample(NamedTuple):
    """One prompt: token ids, the expected answer(s) and what the score compares."""

    ids: list
    answers: list  # multikey: [value]; vartrack: the chain's variable names
    depth: float


def _rng(task: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{task}:{seed}:{index}")


def insert_pieces(
    tokenizer, text: str, L: int, prefix: str, pieces: list, question: str
) -> list[int]:
    """Token ids (at most ``L``) of ``prefix``, the start of ``text`` with each ``(depth,
    piece)`` inserted at relative position ``depth`` (at the nearest sentence boundary when
    one is near; pieces at the same place keep their order), and ``question``. As
    :func:`eval.needle.make_prompt`, with several pieces."""
    head, tail = _encode(tokenizer, prefix), _encode(tokenizer, question)
    encoded = [(float(d), _encode(tokenizer, p)) for d, p in pieces]
    for d, _ in encoded:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d}")
    budget = L - len(head) - len(tail) - sum(len(p) for _, p in encoded)
    if budget <= 0:
        raise ValueError(f"L={L} too short for {len(pieces)} pieces and the question")
    hay = _encode(tokenizer, text)[:budget]
    ends = _sentence_ends(tokenizer, hay)
    late = [e for e in ends if e >= 0.75 * len(hay)]
    if late:
        hay = hay[: late[-1]]
        ends = [e for e in ends if e <= len(hay)]
    cands = [0] + ends
    placed = []
    for order, (d, piece) in enumerate(encoded):
        target = d * len(hay)
        pos = min(cands, key=lambda e: abs(e - target))
        if abs(pos - target) > max(8, 0.05 * len(hay)):
            pos = int(round(target))
        placed.append((pos, order, piece))
    out, prev = list(head), 0
    for pos, _, piece in sorted(placed):
        out += hay[prev:pos] + piece
        prev = pos
    return out + hay[prev:] + tail


def _names(rng: random.Random, n: int) -> list[str]:
    pairs = [f"{c}-{t}" for c in _COLOURS for t in _THINGS]
    return rng.sample(pairs, n)


def make_multikey(
    tokenizer, text: str, L: int, seed: int, index: int, depth: float, num_keys: int = 4
) -> Sample:
    """A multi-key prompt: ``num_keys`` names with 7-digit numbers; the asked one (the
    first) at ``depth``, the distractors at random depths."""
    rng = _rng("multikey", seed, index)
    names = _names(rng, num_keys)
    values = [rng.randint(1_000_000, 9_999_999) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    pieces = [(d, MK_KEY.format(name=n, value=v)) for d, n, v in zip(depths, names, values)]
    order = list(range(num_keys))
    rng.shuffle(order)  # the asked key is not always the first piece at a tie
    pieces = [pieces[i] for i in order]
    question = MK_QUESTION.format(name=names[0])
    ids = insert_pieces(tokenizer, text, L, MK_PREFIX, pieces, question)
    return Sample(ids, [str(values[0])], depth)


def score_multikey(generated: str, sample: Sample) -> float:
    """1.0 when the first 7-digit number in ``generated`` is the asked key's, else 0.0."""
    found = re.search(r"(?<!\d)\d{7}(?!\d)", generated)
    return float(found is not None and found.group(0) == sample.answers[0])


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: list = []
    while len(names) < n:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def make_vartrack(
    tokenizer,
    text: str,
    L: int,
    seed: int,
    index: int,
    depth: float,
    hops: int = 4,
    chains: int = 2,
) -> Sample:
    """A variable-tracking prompt: ``chains`` chains of ``hops + 1`` variables each (5-digit
    values, distinct), statements at random depths in order, the asked chain's first
    statement at ``depth`` (its later links after it)."""
    rng = _rng("vartrack", seed, index)
    names = _var_names(rng, chains * (hops + 1))
    values = rng.sample(range(10000, 100000), chains)
    pieces = []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        start = depth if c == 0 else rng.random()
        spots = sorted([start] + [start + (1 - start) * rng.random() for _ in range(hops)])
        pieces.append((spots[0], VT_VALUE.format(name=chain[0], value=values[c])))
        for d, name, prev in zip(spots[1:], chain[1:], chain[:-1]):
            pieces.append((d, VT_LINK.format(name=name, prev=prev)))
    question = VT_QUESTION.format(value=values[0])
    ids = insert_pieces(tokenizer, text, L, VT_PREFIX, pieces, question)
    return Sample(ids, names[: hops + 1], depth)


def score_vartrack(generated: str, sample: Sample) -> float:
    """Share of the asked chain's variable names present as whole words in ``generated``."""
    words = set(re.findall(r"[A-Z]+", generated))
    return sum(name in words for name in sample.answers) / len(sample.answers)


class Task(NamedTuple):
    make: object  # (tokenizer, text, L, seed, index, depth) -> Sample
    score: object  # (generated, Sample) -> float in [0, 1]
    new_tokens: int  # tokens generated per prompt


TASKS = {
    "multikey": Task(make_multikey, score_multikey, 12),
    "vartrack": Task(make_vartrack, score_vartrack, 32),
}
