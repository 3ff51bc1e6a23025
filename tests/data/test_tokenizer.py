"""declip_fast.data.tokenizer against OpenCLIP's tokenizer, id for id, on generated hard captions."""

from __future__ import annotations

import html
import random
import subprocess
import sys

import pytest
import torch

from declip_fast.data import tokenizer as T

open_clip = pytest.importorskip("open_clip")

WORDS = (
    "a photo of the cat dog sitting on grass near river beautiful sunset over city skyline man woman "
    "child playing football in park red car parked street old building with clock tower yfcc flickr "
    "antidisestablishmentarianism supercalifragilisticexpialidocious pneumonoultramicroscopic "
    "don't it's we're they've I'm you'll he'd JPEG IMG_2047 DSC01234 www.example.com user@mail.org"
).split()
PIECES = [
    # accents, case mappings that change length, combining marks (ftfy normalises to NFC)
    "café",
    "naïve",
    "Ångström",
    "Straße",
    "İstanbul",
    "ǅemal",
    "e\u0301",
    "ﬁancé",
    "ΣΊΣΥΦΟΣ",
    "Ǆ",
    # scripts
    "日本語のテキスト",
    "中文字符",
    "한국어",
    "Привет мир",
    "Ελληνικά",
    "مرحبا",
    "नमस्ते",
    "ภาษาไทย",
    "שלום",
    # emoji, ZWJ sequences, flags, skin tones, variation selectors
    "🎉",
    "👨‍👩‍👧‍👦",
    "🇫🇷🇯🇵",
    "👍🏽",
    "❤️",
    "✔",
    "☃",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\U0001f600\U0001f600",
    # punctuation runs and contractions (upper case too: the pattern ignores case)
    "it'ſ",
    "<ſtart_of_text>",
    "\u212a'LL",
    "İ'S",  # case folding differs from lower(): ſ, K, İ
    "!!!???...",
    "--",
    "''",
    '"quoted"',
    "’s",
    "'S",
    "'LL",
    "'re",
    "(((a)))",
    "#hashtag",
    "@user",
    "___",
    "~~~",
    "$100",
    "50%",
    "C++",
    "...",
    "«»",
    "“smart quotes”",
    "‘single’",
    "—",
    "¯\\_(ツ)_/¯",
    # numbers and number-likes
    "12345",
    "3.14159",
    "1,000,000",
    "²³",
    "Ⅻ",
    "½",
    "٣٤٥",
    "１２３",
    "ＬＯＵＤ　ＮＯＩＳＥＳ",
    "0x1F",
    # HTML entities, nested escapes, tags (a "<" stops ftfy unescaping its line)
    "&amp;",
    "&amp;amp;amp;",
    "&#39;",
    "&lt;b&gt;bold&lt;/b&gt;",
    "&nbsp;",
    "&hellip;",
    "&eacute;",
    "<b>bold</b>",
    "a < b & c",
    "&notanentity;",
    "&#x1F600;",
    "AT&T",
    # mojibake ftfy repairs
    "âœ” No problems",
    "sÃ³",
    "voilÃ le travail",
    "Ã©tÃ©",
    # control characters, invisible characters, odd whitespace
    "\x00",
    "\x1b[31mred\x1b[0m",
    "\x7f",
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "\u200b",
    "\ufeff",
    "\u2028",
    "\r\n",
    "\r",
    "\t",
    "\xa0",
    "\u3000",
    "\u2003",
    "\ud83d",
    # the literal special strings
    "<mask>",
    "<MASK>",
    "<start_of_text>",
    "<end_of_text>",
    "<START_OF_TEXT>",
    "<<start_of_text>>",
    "x<end_of_text>y",
    "</w>",
    "<|endoftext|>",
]
FIXED = [
    "",
    " ",
    "   \t\n  ",
    "\n",
    "<mask>",
    "<start_of_text>",
    "<end_of_text>",
    "a <mask> b",
    "<start_of_text><end_of_text>",
    "&amp;",
    "!",
    "'s",
    "a" * 300,
    "ab" * 200,
    "1" * 100,
    " ".join(WORDS) * 3,
    "🎉" * 100,
    "日本" * 80,
]
UNICODE_RANGES = [
    (0x20, 0x7F),
    (0xA0, 0x250),
    (0x370, 0x530),
    (0x3040, 0x3100),
    (0x4E00, 0x4F00),
    (0xAC00, 0xAD00),
    (0x1F300, 0x1F700),
    (0x2000, 0x2070),
    (0xFF00, 0xFF60),
    (0x0, 0x20),
]


def _caption(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:  # random code points, surrogates excluded
        size = rng.randrange(1, 60)
        return "".join(chr(rng.randrange(*rng.choice(UNICODE_RANGES))) for _ in range(size))
    n = rng.randrange(1, 120 if kind < 0.2 else 25)  # some far beyond 77 tokens
    parts = []
    for _ in range(n):
        token = rng.choice(PIECES) if rng.random() < 0.35 else rng.choice(WORDS)
        if rng.random() < 0.2:
            token = token.upper() if rng.random() < 0.5 else token.title()
        parts.append(token)
        parts.append(rng.choice([" ", " ", " ", "", "  ", ", ", ". ", "\n"]))
    return "".join(parts)


def _captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return FIXED + [_caption(rng) for _ in range(n)]


def _reference(texts: list[str], context_length: int) -> torch.Tensor:
    """OpenCLIP's ids; a caption OpenCLIP cannot tokenize gets a row of -1."""
    rows = []
    for text in texts:
        try:
            rows.append(open_clip.tokenize([text], context_length=context_length))
        except Exception:
            rows.append(torch.full((1, context_length), -1, dtype=torch.long))
    return torch.cat(rows)


def _assert_rows_equal(ours: torch.Tensor, ref: torch.Tensor, texts: list[str]) -> None:
    bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    assert not bad, (
        f"{len(bad)} captions differ; first {texts[bad[0]]!r}:\n ours {ours[bad[0]].tolist()}\n"
        f"  ref {ref[bad[0]].tolist()}"
    )


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip(context_length):
    texts = _captions(2500, seed=context_length)
    ref = _reference(texts, context_length)
    assert (ref[:, 0] != -1).all(), "OpenCLIP failed on a generated caption; fix the generator"
    ours = T.tokenize(texts, context_length=context_length)
    assert ours.shape == ref.shape and ours.dtype == torch.long
    _assert_rows_equal(ours, ref, texts)
    # The generator really reached the interesting cases.
    assert (ours[:, -1] == T.EOT_ID).sum() > 100, "too few truncated captions"
    assert (ours[:, 1] == T.EOT_ID).any(), "no empty caption"


def test_fresh_tokenizer_with_tiny_cache_matches():
    """The bounded word cache (cleared when full) changes nothing."""
    texts = _captions(300, seed=7)
    tok = T.Tokenizer(max_cached_words=8)
    _assert_rows_equal(tok(texts), _reference(texts, 77), texts)
    assert len(tok._cache) <= 8


def test_ascii_fast_path_is_exact():
    """The fast path skips ftfy and html.unescape; check ftfy leaves such text unchanged."""
    import ftfy

    rng = random.Random(3)
    alphabet = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("&")) + "\t\n\r"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80))) for _ in range(3000)]
    texts += ["<b>x</b>\r\n\ty", "a;b#39;", "\x1b", "\x7f", "&amp;"]
    tok = T.get_tokenizer()
    for text in texts:
        slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert tok.clean(text) == slow, repr(text)


def test_special_ids_and_mask():
    ref = open_clip.get_tokenizer("ViT-B-32")
    assert (T.SOT_ID, T.EOT_ID) == (ref.sot_token_id, ref.eot_token_id) == (49406, 49407)
    assert T.PAD_ID == 0 and T.MASK_ID == 49408 and T.VOCAB_SIZE == 49409 == ref.vocab_size + 1
    tok = T.get_tokenizer()
    assert len(tok.decoder) == T.VOCAB_SIZE and tok.encoder["<mask>"] == T.MASK_ID
    assert all(tok.encoder[s] == i for s, i in ref.encoder.items())  # every CLIP id unchanged
    ids = T.tokenize(["<mask>", "a <mask> b", "<MASK><mask>", "[mask]", "mask"], 16)
    assert not (ids == T.MASK_ID).any()
    assert T.tokenize("<mask>", 5).tolist() == [[T.SOT_ID, 283, 8306, 285, T.EOT_ID]]  # "<", "mask", ">"
    # OpenCLIP's pattern matches the literal special strings first; so do we.
    assert T.tokenize("<start_of_text>", 4).tolist() == [[T.SOT_ID, T.SOT_ID, T.EOT_ID, 0]]


def test_truncation_keeps_end_token_last():
    tok = T.get_tokenizer()
    text = " ".join(f"word{i}" for i in range(40))
    ids = tok.encode(text)
    assert len(ids) > 40
    for length in (1, 2, 3, 16, len(ids) + 1, len(ids) + 2, len(ids) + 3):
        row = T.tokenize(text, context_length=length)[0].tolist()
        full = [T.SOT_ID, *ids, T.EOT_ID]
        if len(full) <= length:
            expected = full + [T.PAD_ID] * (length - len(full))
        else:  # cut, and the last kept position becomes the end token (pooling reads it)
            expected = full[: length - 1] + [T.EOT_ID]
        assert row == expected, length
        assert T.EOT_ID in row and row.index(T.EOT_ID) == min(len(full), length) - 1


def test_shapes_dtypes_and_inputs():
    assert T.tokenize("a dog").shape == (1, 77)
    out = T.tokenize(["a", "b c", ""], context_length=16)
    assert out.shape == (3, 16) and out.dtype == torch.int64
    assert T.tokenize([]).shape == (0, 77)
    assert torch.equal(T.tokenize(("a", "b")), T.tokenize(s for s in ["a", "b"]))
    assert T.get_tokenizer() is T.get_tokenizer()
    tok = T.get_tokenizer()
    assert tok.encode_batch(["a dog", "A  DOG "]) == [tok.encode("a dog")] * 2


def test_decode():
    tok = T.get_tokenizer()
    assert tok.decode(tok.encode("Hello, wörld &amp; 日本 🎉")) == "hello , wörld & 日本 🎉 "
    ids = T.tokenize(["a photo of a <mask>", "it's 2024!"], 12)
    for row in ids.tolist():
        assert tok.decode(row) == open_clip.decode(torch.tensor(row))
    assert tok.decode([T.SOT_ID, T.MASK_ID, T.EOT_ID]) == "<start_of_text><mask><end_of_text>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-100])


@pytest.mark.parametrize("texts", [None, 3, b"bytes", [1], ["ok", None], ["ok", b"bytes"], [["nested"]]])
def test_non_text_raises_type_error(texts):
    with pytest.raises(TypeError, match="str"):
        T.tokenize(texts)


@pytest.mark.parametrize("context_length", [0, -1, 1.5, True, "77", None])
def test_bad_context_length_raises(context_length):
    with pytest.raises(ValueError, match="context_length"):
        T.tokenize("a dog", context_length=context_length)


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="open-clip-torch"):
        T.Tokenizer()


def test_import_does_no_work():
    code = (
        "import sys, declip_fast.data.tokenizer as t; "
        "assert not {'open_clip', 'ftfy', 'regex'} & set(sys.modules); "
        "assert t.get_tokenizer.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
