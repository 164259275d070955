"""eval/needle.py: pass key prompt construction and scoring (stub tokenizers, no model)."""

import pytest

from eval.needle import NEEDLE, PREFIX, QUESTION, is_correct, make_key, make_prompt, needle_position


class WordTokenizer:
    """Whitespace-preserving word tokenizer: each token is a word with its leading spaces."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def _id(self, w):
        if w not in self.vocab:
            self.vocab[w] = len(self.words)
            self.words.append(w)
        return self.vocab[w]

    def encode(self, text, add_special_tokens=False):
        import re

        return [self._id(w) for w in re.findall(r"\s*\S+|\s+$", text)]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.words[i] for i in ids)


class CharTokenizer:
    """One token per character; ``encode`` without the ``add_special_tokens`` keyword."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TEXT = " ".join(
    f"Sentence number {i} says something about Emma and Mr. Knightley." for i in range(400)
)


@pytest.mark.parametrize("tok", [WordTokenizer(), CharTokenizer()])
@pytest.mark.parametrize("L", [300, 1000, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_length_needle_and_question(tok, L, depth):
    key = make_key(0, 3)
    ids = make_prompt(tok, TEXT, L, depth, key)
    assert L - 40 <= len(ids) <= L  # fills the budget (less a partial sentence)
    text = tok.decode(ids)
    assert text.startswith(PREFIX)
    assert text.endswith(QUESTION)
    assert text.count(str(key)) == 2
    needle = tok.encode(NEEDLE.format(key=key))
    pos = needle_position(ids, needle)
    assert pos >= 0
    start = len(tok.encode(PREFIX))
    hay = len(ids) - start - len(needle) - len(tok.encode(QUESTION))
    rel = (pos - start) / hay
    assert abs(rel - depth) <= 0.06, (rel, depth)


def test_needle_at_sentence_boundary():
    tok = WordTokenizer()
    key = 12345
    for depth in (0.2, 0.5, 0.8):
        text = tok.decode(make_prompt(tok, TEXT, 1000, depth, key))
        before = text.split(NEEDLE.format(key=key))[0]
        assert before.endswith(".")
    # the haystack ends at a sentence end too
    text = tok.decode(make_prompt(tok, TEXT, 1000, 0.5, key))
    assert text[: -len(QUESTION)].endswith(".")


def test_depth_order_and_errors():
    tok = CharTokenizer()
    key = 55555
    needle = tok.encode(NEEDLE.format(key=key))
    pos = [
        needle_position(make_prompt(tok, TEXT, 3000, d, key), needle)
        for d in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert pos == sorted(pos) and len(set(pos)) == 5
    with pytest.raises(ValueError):
        make_prompt(tok, TEXT, 3000, 1.5, key)
    with pytest.raises(ValueError):
        make_prompt(tok, TEXT, 50, 0.5, key)


def test_keys_seeded_five_digits():
    keys = [make_key(0, i) for i in range(10)]
    assert keys == [make_key(0, i) for i in range(10)]
    assert all(10000 <= k <= 99999 for k in keys)
    assert len(set(keys)) > 1
    assert keys != [make_key(1, i) for i in range(10)]


def test_is_correct():
    assert is_correct(" 48213.", 48213)
    assert is_correct("48213 is the pass key", 48213)
    assert is_correct(" **48213**\n", "48213")
    assert not is_correct(" 4821", 48213)
    assert not is_correct(" 482130", 48213)
    assert not is_correct(" 148213", 48213)
    assert not is_correct(" 48 213", 48213)
    assert not is_correct("", 48213)
