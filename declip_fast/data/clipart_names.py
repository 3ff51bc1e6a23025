"""The clip-art data set's file-name fallback: a name for a drawing whose title is boilerplate.

Used by :mod:`declip_fast.data.clipart_meta`. Playing cards (``bordered_h_k.svg``) become "King of
hearts"; other stems lose numbers, author-name parts (also truncated ones: ``francesc`` of
"Francesco"), editor tags and a one- or two-letter series tail; the rest is a name when one of its
words (>= 3 letters) is an English word: a WordNet lemma from Debian's ``wordnet-base``, plurals
folded.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path, PurePosixPath

from .eda import PARTS, _wordnet_dir

_STEM_JUNK = frozenset({"clipart", "openclipart", "svg", "by", "md", "bw", "bwh", "aj", "v", "copy", "aiga", "symbol"})
_STEM_WORDS = {"chesspieces": "chess", "smilies": "smiley"}
_CARD = re.compile(r"^(?:bordered|ornamental|simple|white)_(?:([cdhs])_(10|[2-9ajkq])|jk_([br]))$")
_SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
_RANKS = dict(
    zip(
        "a 2 3 4 5 6 7 8 9 10 j q k".split(), "Ace Two Three Four Five Six Seven Eight Nine Ten Jack Queen King".split()
    )
)


@functools.lru_cache(maxsize=None)
def english_words(folder: str | None = None) -> frozenset[str]:
    """Single-word WordNet lemmas (``index.{noun,verb,adj,adv}`` of Debian's ``wordnet-base``)."""
    root = _wordnet_dir() if folder is None else Path(folder)
    words = set()
    for part in PARTS:
        try:
            with open(f"{root}/index.{part}", encoding="utf-8", errors="replace") as f:
                words.update(line.split(" ", 1)[0] for line in f if line[:1].isalpha())
        except OSError as err:
            raise FileNotFoundError(
                f"WordNet index.{part} not found in {root}: install Debian's wordnet-base "
                "(apt-get install wordnet-base) or point DECLIP_FAST_WORDNET at it"
            ) from err
    return frozenset(w for w in words if "_" not in w)


def is_english(word: str, words: frozenset[str]) -> bool:
    word = word.lower()
    forms = (word, word[:-1] if word.endswith("s") else "", word[:-2] if word.endswith("es") else "")
    return any(f in words for f in forms) or (word.endswith("ies") and word[:-3] + "y" in words)


def fallback_name(path: str, creator: str, words: frozenset[str]) -> str | None:
    """A name from the file name (``.../bordered_h_k.svg`` -> "King of Hearts",
    ``.../lightning_jon_phillips_01.svg`` -> "Lightning"), or None without an English word in it."""
    stem = PurePosixPath(path).stem
    card = _CARD.match(stem.lower())
    if card:
        suit, rank, joker = card.groups()
        return f"{'Black' if joker == 'b' else 'Red'} Joker" if joker else f"{_RANKS[rank]} of {_SUITS[suit]}"
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem).lower()  # camelCase -> camel case
    author = [t for t in re.split(r"[^a-z]+", creator.lower()) if len(t) >= 3]
    tokens = []
    for token in re.split(r"[^a-z0-9]+", stem):
        token = re.sub(r"(?<=[a-z]{2})\d+$", "", token)  # "transportation1": a series number
        if len(token) < 2 or any(c.isdigit() for c in token) or token in _STEM_JUNK:
            continue
        if len(token) >= 3 and any(a.startswith(token) for a in author):  # "francesc" of "francesco"
            continue
        tokens.append(_STEM_WORDS.get(token, token))
    while len(tokens) > 1 and len(tokens[-1]) <= 2:  # "bullet hole aa": a series' letter
        tokens.pop()
    if not any(len(t) >= 3 and is_english(t, words) for t in tokens):
        return None
    name = " ".join(tokens)
    return name[:1].upper() + name[1:]
