"""Needle-in-a-haystack (pass key) retrieval: prompt construction and scoring.

Pure functions; the tokenizer only needs ``encode(text)`` and ``decode(ids)`` (a Hugging Face
tokenizer, or a stub in the tests). ``eval/accuracy.py --tasks needle`` runs them on a model.
"""

from __future__ import annotations

import random
import re

PREFIX = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it.\n\n"
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
# a token ends a sentence when, trailing whitespace stripped, it ends with one of these (line
# breaks alone do not count: the Austen texts are hard-wrapped)
SENTENCE_ENDS = (".", "!", "?", '."', '!"', '?"', ".'", "!'", "?'")


def _encode(tokenizer, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # stubs without the keyword
        ids = tokenizer.encode(text)
    return list(ids)


def make_key(seed: int, index: int) -> int:
    """A random 5-digit pass key, reproducible from ``(seed, index)``."""
    return random.Random(seed * 1_000_003 + index).randint(10000, 99999)


def _sentence_ends(tokenizer, ids: list[int]) -> list[int]:
    """Positions ``i`` (0 < i <= len(ids)) such that ``ids[:i]`` ends a sentence."""
    return [
        i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).rstrip().endswith(SENTENCE_ENDS)
    ]


def make_prompt(tokenizer, text: str, L: int, depth: float, key: int) -> list[int]:
    """Token ids (at most ``L``) of: a short instruction, the start of ``text`` with the pass
    key sentence inserted at relative position ``depth`` (in [0, 1], at a sentence boundary
    where one is near), and the final question ``"... The pass key is"``.

    The haystack is the first tokens of ``text`` that fit, cut back to the last sentence end
    when one lies in its last quarter (else at a token boundary). Pieces are tokenized
    separately and concatenated, so the length is exact.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    prefix = _encode(tokenizer, PREFIX)
    needle = _encode(tokenizer, NEEDLE.format(key=key))
    question = _encode(tokenizer, QUESTION)
    budget = L - len(prefix) - len(needle) - len(question)
    if budget <= 0:
        raise ValueError(f"L={L} too short for the needle prompt")
    hay = _encode(tokenizer, text)[:budget]
    ends = _sentence_ends(tokenizer, hay)
    tail = [e for e in ends if e >= 0.75 * len(hay)]
    if tail:
        hay = hay[: tail[-1]]
        ends = [e for e in ends if e <= len(hay)]
    target = depth * len(hay)
    # nearest sentence end to the target position (or the start), else the token position
    cands = [0] + ends
    pos = min(cands, key=lambda e: abs(e - target))
    if abs(pos - target) > max(8, 0.05 * len(hay)):
        pos = int(round(target))
    return prefix + hay[:pos] + needle + hay[pos:] + question


def needle_position(ids: list[int], needle_ids: list[int]) -> int:
    """Index of the first occurrence of ``needle_ids`` in ``ids`` (-1 if absent)."""
    n = len(needle_ids)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == needle_ids:
            return i
    return -1


def is_correct(generated_text: str, key: int) -> bool:
    """Exact match: the generated text contains the pass key as a whole number."""
    return re.search(rf"(?<!\d){int(key)}(?!\d)", generated_text) is not None
