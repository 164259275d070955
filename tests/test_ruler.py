"""eval/ruler.py: multi-key needle and variable tracking prompts and scoring (stub
tokenizers, no model)."""

import re

import pytest

from eval.ruler import (
    MK_PREFIX,
    VT_PREFIX,
    Sample,
    insert_pieces,
    make_multikey,
    make_vartrack,
    score_multikey,
    score_vartrack,
)

from .test_needle import TEXT, CharTokenizer, WordTokenizer

CASES = [(WordTokenizer(), 400), (WordTokenizer(), 2048), (CharTokenizer(), 1500)]


@pytest.mark.parametrize("tok, L", CASES)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_multikey_prompt(tok, L, depth):
    s = make_multikey(tok, TEXT, L, seed=0, index=3, depth=depth, num_keys=4)
    assert 0.8 * L <= len(s.ids) <= L
    text = tok.decode(s.ids)
    assert text.startswith(MK_PREFIX)
    keys = re.findall(r"The secret number of ([a-z]+-[a-z]+) is (\d{7})\.", text)
    assert len(keys) == 4 and len({n for n, _ in keys}) == 4
    asked = re.search(r"What is the secret number of ([a-z]+-[a-z]+)\?", text).group(1)
    assert (asked, s.answers[0]) in keys
    assert make_multikey(tok, TEXT, L, 0, 3, depth).ids == s.ids  # deterministic
    assert make_multikey(tok, TEXT, L, 0, 4, depth).ids != s.ids


@pytest.mark.parametrize("tok, L", CASES)
def test_vartrack_prompt_chains_in_order(tok, L):
    s = make_vartrack(tok, TEXT, L, seed=1, index=0, depth=0.2, hops=4, chains=2)
    assert len(s.ids) <= L and len(s.answers) == 5
    text = tok.decode(s.ids)
    assert text.startswith(VT_PREFIX)
    value = re.search(r"VAR " + s.answers[0] + r" = (\d{5})\.", text).group(1)
    for prev, name in zip(s.answers, s.answers[1:]):
        link = f"VAR {name} = VAR {prev}."
        assert text.count(link) == 1
        assert text.index(f"VAR {prev} =") < text.index(link)  # each link after its source
    assert text.count(" = VAR ") == 8  # 4 links in each of the 2 chains
    assert text.rstrip().endswith(f"holding {value} are")


def test_insert_pieces_keeps_order_and_length():
    tok = WordTokenizer()
    ids = insert_pieces(
        tok, TEXT, 300, "Start.", [(0.5, " AAA."), (0.5, " BBB."), (0.1, " C.")], "?"
    )
    text = tok.decode(ids)
    assert len(ids) <= 300
    assert text.index(" C.") < text.index(" AAA.") < text.index(" BBB.")
    with pytest.raises(ValueError):
        insert_pieces(tok, TEXT, 3, "Start.", [(0.5, " AAA.")], "?")


def test_scores():
    mk = Sample([], ["1234567"], 0.0)
    assert score_multikey(" 1234567.", mk) == 1.0
    assert score_multikey(" 7654321, not 1234567", mk) == 0.0
    assert score_multikey(" 12345678", mk) == 0.0
    vt = Sample([], ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], 0.0)
    assert score_vartrack(" ABCDE, FGHIJ, KLMNO, PQRST", vt) == 1.0
    assert score_vartrack(" ABCDE, FGHIJX and KLMNO", vt) == 0.5
