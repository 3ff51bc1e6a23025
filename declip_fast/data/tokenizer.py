"""CLIP's byte-level BPE tokenizer, id-for-id equal to OpenCLIP's ``tokenize``, plus a ``<mask>`` id.

Ids 0..49407 are exactly OpenAI's / OpenCLIP's (256 byte symbols, their 256 end-of-word forms,
48,894 merges, ``<start_of_text>``, ``<end_of_text>``), so checkpoints and token ids stay
interchangeable. DeCLIP's MLM needs one more id, ``MASK_ID`` = 49408, appended after them; text
never produces it (the caption "<mask>" tokenizes as OpenCLIP does: "<", "mask", ">"). The literal
strings "<start_of_text>" and "<end_of_text>" inside a caption do become the special ids, because
OpenCLIP's splitting pattern matches them first; we keep that for equality.

Cleaning is OpenCLIP's "lower" cleaning: ftfy.fix_text, html.unescape twice, whitespace collapsed,
lower-cased. Speed comes from two places, both exact:
- a fast path for captions of printable ASCII (plus tab/newline/CR) without "&": ftfy and
  html.unescape leave such text unchanged (ftfy's fixes touch only non-ASCII text, escape and
  control characters, and CR/LF, which whitespace collapsing erases anyway), so they are skipped;
- a cache from each whitespace-separated chunk (and each pre-token) to its ids, so a word is
  split, byte-encoded and merged once; it is cleared when it reaches ``max_cached_words``.
Captions outside the fast path pay for ftfy, which is most of the time on a mix with 15%
non-ASCII captions (benchmarks/bench_tokenizer.py; see benchmarks/results). HF ``tokenizers``
would be faster still but is not installed here; this stays pure Python.

The vocabulary file ships inside the open-clip-torch wheel. It is found without importing open_clip
(whose import pulls in its model zoo and builds its own tokenizer), read on first use, and the
tokenizer is built once per process (``get_tokenizer``). Nothing happens at import time.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import re as _stdlib_re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from declip_fast.data.schema import CONTEXT_LENGTH

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merges OpenAI's vocabulary uses (the file holds more)
PAD_ID = 0
SOT_ID = 49406
EOT_ID = 49407
MASK_ID = 49408
VOCAB_SIZE = MASK_ID + 1  # 49,408 CLIP ids + <mask>
SOT_TEXT, EOT_TEXT, MASK_TEXT = "<start_of_text>", "<end_of_text>", "<mask>"
_SPECIAL_IDS = {SOT_TEXT: (SOT_ID,), EOT_TEXT: (EOT_ID,)}  # spelled in a caption: see docstring

# OpenCLIP's pre-token pattern (contractions, letter runs, single digits, runs of anything else),
# with its two special tokens tried first. Needs the third-party ``regex`` for \p{..} classes.
_PRETOKEN_PATTERN = rf"{SOT_TEXT}|{EOT_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"
# Any character outside this set sends a caption through ftfy + html.unescape (see docstring).
_NEEDS_FULL_CLEAN = _stdlib_re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


def _byte_table() -> tuple[list[str], dict[int, str]]:
    """(256 byte symbols in vocabulary order, byte value -> symbol): the GPT-2 byte-level scheme.

    Bytes that are printable Latin-1 stand for themselves and come first; the other 68 bytes get,
    in byte order, code points 256, 257, ... so no symbol is whitespace or a control character.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    symbols = [chr(b) for b in printable] + [chr(256 + k) for k in range(len(others))]
    return symbols, dict(zip(printable + others, symbols))


def find_bpe_file() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the CLIP tokenizer reads its vocabulary from the open-clip-torch package, which is not "
            "installed: pip install open-clip-torch (or pip install 'declip-fast[dev]')"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{BPE_FILE} not found in open_clip at {list(spec.submodule_search_locations)}")


def _import_cleaners():
    try:
        import ftfy
        import regex
    except ModuleNotFoundError as err:  # both come with open-clip-torch
        raise ModuleNotFoundError(
            f"the CLIP tokenizer needs '{err.name}' (installed with open-clip-torch): pip install {err.name}"
        ) from err
    return ftfy, regex


class Tokenizer:
    """CLIP BPE tokenizer. ``encode``/``encode_batch`` give ids without start/end tokens;
    calling it (or ``pack``) gives OpenCLIP's padded, truncated [N, context_length] LongTensor."""

    def __init__(self, bpe_path: str | Path | None = None, max_cached_words: int = 1_000_000):
        ftfy, regex = _import_cleaners()
        self._fix_text = ftfy.fix_text
        self._pretokens = regex.compile(_PRETOKEN_PATTERN, regex.IGNORECASE).findall
        with gzip.open(bpe_path or find_bpe_file()) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        symbols, byte_to_symbol = _byte_table()
        self._byte_to_symbol = byte_to_symbol
        self._symbol_to_byte = {c: b for b, c in byte_to_symbol.items()}
        vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
        vocab += [SOT_TEXT, EOT_TEXT, MASK_TEXT]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE or self.encoder[SOT_TEXT] != SOT_ID:
            raise ValueError(f"{bpe_path or BPE_FILE} is not CLIP's vocabulary ({len(self.encoder)} ids)")
        self.decoder = vocab
        self._ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self._max_cached = max_cached_words
        self._cache: dict[str, tuple[int, ...]] = {}

    # -- text -> pre-tokens -------------------------------------------------------------------

    def clean(self, text: str) -> str:
        """OpenCLIP's "lower" cleaning of one caption."""
        if _NEEDS_FULL_CLEAN.search(text) is not None:
            text = html.unescape(html.unescape(self._fix_text(text)))
        return " ".join(text.split()).lower()

    def pretokens(self, text: str) -> list[str]:
        """The cleaned caption split into the words BPE runs on (before byte encoding)."""
        return self._pretokens(self.clean(text))

    # -- BPE ----------------------------------------------------------------------------------

    def _merge(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token: byte symbols, last marked end-of-word, merged lowest rank first."""
        table = self._byte_to_symbol
        parts = [table[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        ranks = self._ranks
        while len(parts) > 1:
            rank, best = min((ranks.get(p, NUM_MERGES), p) for p in zip(parts, parts[1:]))
            if rank == NUM_MERGES:
                break
            left, right = best
            merged, i, n = [], 0, len(parts)
            while i < n:  # every non-overlapping occurrence, scanning left to right
                if i + 1 < n and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def _ids(self, chunk: str) -> tuple[int, ...]:
        """Ids of a whitespace-free chunk (one or more pre-tokens), cached. A pre-token splits to
        itself, so chunks and pre-tokens share one cache."""
        words = self._pretokens(chunk)
        if words == [chunk]:
            ids = _SPECIAL_IDS.get(chunk) or self._merge(chunk)
        else:
            get, ids = self._cache.get, ()
            for word in words:
                ids += get(word) or self._ids(word)
        if len(self._cache) >= self._max_cached:  # bounded memory on huge caption sets
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def _encode(self, text: str) -> list[int]:
        # Pre-tokens never contain whitespace, so the ids of a caption are the ids of its
        # whitespace-separated chunks, one after another; chunks repeat a lot, so cache them.
        if _NEEDS_FULL_CLEAN.search(text) is None:
            chunks = text.lower().split()  # == clean(text).split(" ") on this alphabet
        else:
            chunks = self.clean(text).split(" ")
        get, miss = self._cache.get, self._ids
        ids: list[int] = []
        for chunk in chunks:
            ids += get(chunk) or miss(chunk)
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, without start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"a caption must be a str, got {type(text).__name__}")
        return self._encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Ids of each caption, without start/end tokens (a str is one caption)."""
        texts = _as_text_list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} must be a str, got {type(text).__name__}")
        return [self._encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, as OpenCLIP decodes them: end of word -> space, special tokens spelled out,
        padding (id 0) shows as "!"."""
        symbols = []
        for i in ids:
            if not 0 <= int(i) < VOCAB_SIZE:
                raise ValueError(f"token id {int(i)} is outside [0, {VOCAB_SIZE})")
            symbols.append(self.decoder[int(i)])
        # Every character of every entry, special tokens included, stands for one byte.
        raw = bytes(self._symbol_to_byte[c] for c in "".join(symbols))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """[len(texts), context_length] int64 ids, exactly as ``open_clip.tokenize``."""
        _check_context_length(context_length)
        return pack(self.encode_batch(texts), context_length)


def _as_text_list(texts) -> list:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    return list(texts)


def _check_context_length(context_length: int) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")


def pack(encoded: Sequence[Sequence[int]], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """[N, context_length] int64: start, ids, end, zero padding. Too-long captions are cut and
    their last position set to the end token, as OpenCLIP does (the text tower pools there)."""
    _check_context_length(context_length)
    out = np.zeros((len(encoded), context_length), dtype=np.int64)
    for row, ids in zip(out, encoded):
        tokens = [SOT_ID, *ids, EOT_ID]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = EOT_ID
        row[: len(tokens)] = tokens
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer, built on first use."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """OpenCLIP's ``open_clip.tokenize``: LongTensor [len(texts), context_length] (a str is one text)."""
    return get_tokenizer()(texts, context_length)
