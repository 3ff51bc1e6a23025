"""EDA (easy data augmentation) for DeCLIP's second text view, as DeCLIP uses it (Wei & Zou 2019).

One operation per caption, chosen uniformly:

- synonym replacement: one word (not a stop-word) that has WordNet synonyms is replaced by one of
  them, chosen uniformly (multi-word lemmas become several words);
- random swap: two positions are swapped;
- random deletion: each word is dropped with p = 0.1; if every word would go, one random word
  stays.

An operation that cannot apply (no replaceable word; fewer than two words) leaves the caption as
it is: the caption is still a valid view. Random insertion is not used. Words are
whitespace-separated; punctuation stuck to a word stays with it and the synonym lookup uses the
lower-cased letters (the CLIP tokenizer lower-cases anyway).

WordNet comes from Debian's ``wordnet-base`` (``/usr/share/wordnet/data.{noun,verb,adj,adv}``, the
format of ``man 5 wndb``): every synset line lists its words, and two words are synonyms when they
share a synset. The table is built once per process on first use (about a second; loader
workers forked afterwards share it). ``DECLIP_FAST_WORDNET`` overrides the folder.
"""

from __future__ import annotations

import functools
import os
import random
import re
from pathlib import Path

WORDNET_DIR = "/usr/share/wordnet"
PARTS = ("noun", "verb", "adj", "adv")
OPS = ("synonym", "swap", "delete")
DELETE_P = 0.1

# English function words: never replaced by a synonym (EDA's rule; "a", "the", ... have no
# useful synonyms and WordNet maps some of them to odd senses, e.g. "a" -> "angstrom").
STOP_WORDS = frozenset(
    """
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has
have having he her here hers herself him himself his how i if in into is it its itself just me
more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they
this those through to too under until up very was we were what when where which while who whom
why will with would you your yours yourself yourselves
""".split()
)

_CORE = re.compile(r"^(\W*)(.*?)(\W*)$")


def _wordnet_dir() -> Path:
    return Path(os.environ.get("DECLIP_FAST_WORDNET", WORDNET_DIR))


@functools.lru_cache(maxsize=None)
def synonym_table(folder: str | None = None) -> dict[str, tuple[str, ...]]:
    """word -> its WordNet synonyms (sorted, without the word itself), from the data.* files."""
    root = Path(folder) if folder else _wordnet_dir()
    missing = [p for p in PARTS if not (root / f"data.{p}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files data.{{{','.join(missing)}}} not found in {root}: install the Debian "
            "package wordnet-base (make setup does) or point DECLIP_FAST_WORDNET at a WordNet 3.0 dict folder"
        )
    synonyms: dict[str, set[str]] = {}
    for part in PARTS:
        with open(root / f"data.{part}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.split(" ", 4)
                count = int(fields[3], 16)
                words = line.split(" ")[4 : 4 + 2 * count : 2]
                lemmas = {re.sub(r"\(.*\)$", "", w).lower() for w in words}
                if len(lemmas) < 2:
                    continue
                for w in lemmas:
                    synonyms.setdefault(w, set()).update(lemmas)
    return {w: tuple(sorted(s - {w})) for w, s in synonyms.items() if len(s) > 1}


def _synonym_replacement(words: list[str], rng: random.Random, table) -> list[str]:
    candidates = []
    for i, word in enumerate(words):
        core = _CORE.match(word).group(2).lower()
        if len(core) > 1 and core not in STOP_WORDS and core in table:
            candidates.append(i)
    if not candidates:
        return words
    i = rng.choice(candidates)
    head, core, tail = _CORE.match(words[i]).groups()
    choice = rng.choice(table[core.lower()]).replace("_", " ")
    return words[:i] + [head + choice + tail] + words[i + 1 :]


def _random_swap(words: list[str], rng: random.Random) -> list[str]:
    if len(words) < 2:
        return words
    i, j = rng.sample(range(len(words)), 2)
    out = list(words)
    out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words: list[str], rng: random.Random) -> list[str]:
    if not words:
        return words
    kept = [w for w in words if rng.random() >= DELETE_P]
    return kept if kept else [rng.choice(words)]


def eda(caption: str, rng: random.Random, table=None) -> str:
    """One EDA operation, chosen uniformly, applied to ``caption``; ``rng`` makes it reproducible."""
    if not isinstance(caption, str):
        raise TypeError(f"eda takes a str caption, got {type(caption).__name__}")
    table = synonym_table() if table is None else table
    words = caption.split()
    op = rng.choice(OPS)
    if op == "synonym":
        words = _synonym_replacement(words, rng, table)
    elif op == "swap":
        words = _random_swap(words, rng)
    else:
        words = _random_deletion(words, rng)
    return " ".join(words)


def eda_batch(captions: list[str], seed: int) -> list[str]:
    """EDA of every caption with one generator seeded by ``seed``: the same seed, the same views."""
    rng = random.Random(seed)
    table = synonym_table()
    return [eda(c, rng, table) for c in captions]
