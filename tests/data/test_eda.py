"""EDA: valid views, each operation occurring, reproducible, and a clear error without WordNet."""

import collections
import random

import pytest

from declip_fast.data import eda

CAPTIONS = [
    "A quick brown dog jumps over the lazy cat.",
    "two people riding bikes on a sunny road",
    "Close-up of a red car, parked near the old church!",
    "sunset",
    "",
]


def _op_of(before: str, after: str, table) -> str:
    """Which operation explains ``after`` (one of them must)."""
    b, a = before.split(), after.split()
    if a == b:
        return "none"
    if len(a) == len(b) and sorted(a) == sorted(b):
        diff = [i for i in range(len(b)) if a[i] != b[i]]
        if len(diff) == 2 and a[diff[0]] == b[diff[1]]:
            return "swap"
    if len(a) < len(b) and all(w in b for w in a):
        it = iter(b)
        if all(w in it for w in a):  # a subsequence of the original: deletion
            return "delete"
    for i, w in enumerate(b):  # one word replaced by a (possibly multi-word) synonym
        head, core, tail = eda._CORE.match(w).groups()
        for syn in table.get(core.lower(), ()):
            if " ".join(b[:i] + [head + syn.replace("_", " ") + tail] + b[i + 1 :]) == after:
                return "synonym"
    raise AssertionError(f"{before!r} -> {after!r} is no EDA operation")


def test_every_output_is_one_operation_and_each_occurs():
    table = eda.synonym_table()
    rng = random.Random(0)
    seen = collections.Counter()
    for _ in range(300):
        for caption in CAPTIONS[:3]:
            out = eda.eda(caption, rng, table)
            assert out.strip(), "a view must keep at least one word"
            seen[_op_of(caption, out, table)] += 1
    assert seen["synonym"] > 150 and seen["swap"] > 150 and seen["delete"] > 100, seen


def test_synonyms_come_from_wordnet_and_skip_stop_words():
    table = eda.synonym_table()
    assert "canis_familiaris" in table["dog"] and "dog" not in table["dog"]
    words = ["the", "a", "of", "dog"]
    rng = random.Random(1)
    for _ in range(50):
        out = eda._synonym_replacement(words, rng, table)
        assert out[:3] == ["the", "a", "of"] and out[3] != "dog"


def test_deletion_never_empties_and_short_captions_survive():
    rng = random.Random(2)
    for _ in range(200):
        assert len(eda._random_deletion(["one"], rng)) == 1
        assert 1 <= len(eda._random_deletion("a b c".split(), rng)) <= 3
    assert eda.eda("", rng) == ""
    assert eda.eda("sunset", rng).strip()


def test_seeded_batches_repeat():
    assert eda.eda_batch(CAPTIONS * 20, seed=5) == eda.eda_batch(CAPTIONS * 20, seed=5)
    assert eda.eda_batch(CAPTIONS * 20, seed=5) != eda.eda_batch(CAPTIONS * 20, seed=6)


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DECLIP_FAST_WORDNET", str(tmp_path))
    eda.synonym_table.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="wordnet-base"):
            eda.synonym_table()
    finally:
        monkeypatch.delenv("DECLIP_FAST_WORDNET")
        eda.synonym_table.cache_clear()


def test_non_text_is_rejected():
    with pytest.raises(TypeError, match="str"):
        eda.eda(None, random.Random(0))
