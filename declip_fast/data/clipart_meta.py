"""The clip-art data set's text side: reading an SVG's RDF metadata and cleaning it into a caption.

Used by :mod:`declip_fast.data.clipart`. Every SVG of Debian's ``openclipart-svg`` carries a
``<metadata>`` block (RDF with Dublin Core): ``dc:title``, ``dc:description``, keywords
(``dc:subject/rdf:Bag/rdf:li``), ``dc:creator`` and ``cc:license``. About half the titles are
collection boilerplate ("gramastar" 1,375 times, "Part of the Flat Icon Collection (...)", "Lemon
SVG theme", "card", ...) and keywords hold junk (``hash(0x853b2b0)``, collection tags, the author).

The rules, applied by :func:`make_captions` over the whole (deduplicated) collection:

- a title is cleaned (:func:`clean_title`: the "Clipart by AUTHOR - " prefix, underscores, an
  ``openclipart`` tag and leading numbers go) and is *boilerplate* when it is empty, is the
  author's name, names a collection (``BOILERPLATE``) or repeats ``MAX_TITLE_REPEATS`` (5) or more
  times in the collection;
- a file with a boilerplate title gets a name from its file name (:func:`fallback_name`: playing
  cards become "King of Hearts"; otherwise the stem's words without numbers, author-name parts and
  one-letter tails) when one of its words is an English word (WordNet's lemmas, from
  ``wordnet-base``) and that name, too, repeats fewer than 5 times; else it is skipped;
- a description is kept when short (<= 120 characters), not an e-mail/URL/collection note, not the
  title again and not repeated 5+ times (:func:`clean_description`);
- keywords (:func:`clean_keywords`): HTML entities unescaped, lower-cased, underscores as spaces,
  split at commas; dropped: ``hash(...)``/hex junk, numbers, run-together words, collection tags,
  the title, the author, repeats; at most ``MAX_KEYWORDS``.

caption = title [+ ". " + description] + ". Keywords: " + keywords (the last part only when there
are any). Deterministic: no randomness, and every count is over the sorted file list.
"""

from __future__ import annotations

import collections
import hashlib
import html
import re
import xml.etree.ElementTree as ET
from typing import NamedTuple

from .clipart_names import english_words, fallback_name, is_english  # noqa: F401  (re-exported)

MAX_TITLE_REPEATS = 5  # a title (or file-name fallback) this frequent is boilerplate
MAX_KEYWORDS = 8
MAX_DESCRIPTION_CHARS = 120
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"

# Titles (after clean_title) that name a collection, not a drawing.
BOILERPLATE = re.compile(
    r"\bcollection\b|\btheme\b|icon ?set|^part of\b|s[iu]b?mission|^various cliparts?$|^clip ?art\b|^untitled\b",
    re.IGNORECASE,
)
# Collections whose file names are no names either (icon-theme action names, gradients, Italian
# and French file names): a boilerplate title there is skipped, never replaced by the file name.
NO_FALLBACK = re.compile(
    r"flat icon collection|lemon svg theme|gradient collection|etiquette icons|icon-?set|icon-theme|gold-theme"
    r"|various cliparts|^advertising$|^gramastar$",
    re.IGNORECASE,
)
# Keyword tags of collections and of the package's folders, no help to a caption.
COLLECTION_KEYWORDS = frozenset(
    "unsorted|special|signs and symbols|lemon theme icon|etiquette icons|mapsym|map symbol|networksym|weathersym"
    "|musicsym|appicon|magick|openclipart|clipart|clip art|theme|icons|gradients|stock|miscellany|subnational"
    "|united nations member|mime-types|mimetypes|menu|webpage|hash|svg".split("|")
)
_JUNK_KEYWORD = re.compile(r"^hash\b|^\(?0x[0-9a-f]+\)?$|^[0-9a-f]*\d[0-9a-f]*$", re.IGNORECASE)


class Svg(NamedTuple):
    """One SVG's metadata; ``path`` is relative to the collection's root, '/'-separated."""

    path: str
    digest: str  # hash of the drawing: metadata, editor file names and whitespace left out
    title: str
    description: str
    keywords: tuple[str, ...]
    creator: str
    licenses: tuple[str, ...]


class Caption(NamedTuple):
    svg: Svg
    name: str  # the title the caption starts with
    caption: str
    group: str  # caption group: near-duplicates share one (see caption_group)
    source: str  # "title" or "file name"


# -- reading ------------------------------------------------------------------------------------

_META = re.compile(rb"<(?:\w+:)?metadata\b.*?</(?:\w+:)?metadata\s*>|<(?:\w+:)?metadata\b[^>]*/>", re.DOTALL)
_EDITOR_ATTRS = re.compile(rb'\s(?:sodipodi:docname|sodipodi:docbase|inkscape:export-filename)="[^"]*"')


def drawing_digest(data: bytes) -> str:
    """SHA-256 of an SVG without its metadata, editor file names and whitespace: the package's
    copies of one drawing in several folders differ only there (their keywords name the folder)."""
    data = _META.sub(b"", data)
    head = data.find(b">", data.find(b"<svg")) + 1  # the editor's file names sit on the root element
    data = _EDITOR_ATTRS.sub(b"", data[:head]) + data[head:]
    return hashlib.sha256(b" ".join(data.split())).hexdigest()


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _text(element) -> str:
    return " ".join(repair(html.unescape(" ".join(element.itertext()))).split()) if element is not None else ""


def repair(text: str) -> str:
    """UTF-8 that was decoded as Latin-1 / cp1252 once ("LÃ©zard" -> "Lézard"), decoded right."""
    if re.search("[ÃÂâ][\x80-\xbf€™œ]", text):
        for codec in ("latin-1", "cp1252"):
            try:
                return text.encode(codec).decode("utf-8")
            except UnicodeError:
                pass
    return text


def _child(element, name: str):
    return next((c for c in element if _local(c.tag) == name), None) if element is not None else None


def _metadata(data: bytes, step: int = 4096):
    """The ``<metadata>`` element of an SVG, parsed only that far (3x faster than the whole file:
    errors after it are rsvg-convert's to find); the root when there is none."""
    parser = ET.XMLPullParser(events=("start", "end"))
    root = None
    for start in range(0, len(data), step):
        parser.feed(data[start : start + step])
        for event, element in parser.read_events():
            root = element if root is None else root
            if event == "end" and _local(element.tag) == "metadata":
                return element
    parser.close()
    return root if root is not None else ET.fromstring(data)


def parse_svg(path: str, data: bytes) -> Svg:
    """The metadata of one SVG file's bytes; raises ``xml.etree.ElementTree.ParseError`` on bad XML
    (up to the end of its metadata)."""
    root = _metadata(data)
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    title = _text(_child(work, "title"))
    description = _text(_child(work, "description"))
    subject, keywords = _child(work, "subject"), []
    if subject is not None:
        items = [li for li in subject.iter() if _local(li.tag) == "li"]
        keywords = [_text(li) for li in items] if items else re.split(r"[,;]", _text(subject))
    creator = _text(_child(_child(_child(work, "creator"), "Agent"), "title")) or _text(_child(work, "creator"))
    licenses = []
    license_ = _child(work, "license")
    if license_ is not None:
        licenses.append(license_.get(f"{_RDF}resource") or _text(license_))
    licenses += [e.get(f"{_RDF}about") or "" for e in root.iter() if _local(e.tag) == "License"]
    return Svg(
        path,
        drawing_digest(data),
        title,
        description,
        tuple(keywords),
        creator,
        tuple(x.strip() for x in licenses if x and x.strip()),
    )


def is_public_domain(svg: Svg) -> bool:
    """No license statement (the package's own dedication: all of openclipart is public domain)
    or only public-domain / CC0 ones. Anything else (2 files are GPL) is excluded."""
    return all(re.search(r"public\s*domain|publicdomain|cc0", x, re.IGNORECASE) for x in svg.licenses)


# -- cleaning -----------------------------------------------------------------------------------


def _norm(text: str) -> str:
    """Lower-cased words of ``text``, for comparisons and counts."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def clean_title(title: str) -> str:
    title = " ".join(html.unescape(title).split())
    title = re.sub(r"^clip ?art by [^-]*? - ", "", title, flags=re.IGNORECASE)
    title = re.sub(r"\.svg$", "", title, flags=re.IGNORECASE).replace("_", " ")
    title = re.sub(r"\bopenclipart\b", "", title, flags=re.IGNORECASE)
    title = re.sub(r"^(?:\d+\s+)+(?=[^\W\d])", "", " ".join(title.split()))
    return title.strip(" .,;:-")


def is_boilerplate(title: str, creator: str = "") -> bool:
    """Empty, no letters, the author's name or a collection's name (repeats are counted elsewhere)."""
    return not re.search(r"[^\W\d_]", title) or _norm(title) == _norm(creator) or bool(BOILERPLATE.search(title))


def clean_description(description: str, title: str, repeats: int = 1) -> str:
    """The description when short and informative, else ""."""
    text = " ".join(description.split()).strip(" .")
    if (
        not text
        or len(text) > MAX_DESCRIPTION_CHARS
        or repeats >= MAX_TITLE_REPEATS
        or set(caption_group(text).split()) <= set(caption_group(title).split())
        or re.search(r"@|https?:|www\.|converted from|\bcollection\b|clip ?art by|^part of", text, re.IGNORECASE)
        or re.search(r"hash\(|0x[0-9a-f]{4}", text, re.IGNORECASE)
        or not re.search(r"[^\W\d_]{3}", text)
    ):
        return ""
    return text


def clean_keywords(keywords, title: str = "", creator: str = "", extra_junk=frozenset()) -> list[str]:
    """Keywords kept for the caption, in file order (see the module docstring)."""
    drop = {_norm(title), _norm(creator)} | extra_junk
    out: list[str] = []
    for raw in keywords:
        for keyword in html.unescape(raw).split(","):
            keyword = " ".join(keyword.replace("_", " ").lower().split()).strip(" .;:-")
            if (
                not keyword
                or _JUNK_KEYWORD.search(keyword)
                or not re.search(r"[^\W\d_]{2}", keyword)
                or any(len(w) > 20 for w in keyword.split())
                or keyword in COLLECTION_KEYWORDS
                or _norm(keyword) in drop
                or keyword in out
            ):
                continue
            out.append(keyword)
    return out[:MAX_KEYWORDS]


def caption_group(name: str) -> str:
    """The group of a caption: its title lower-cased, without numbers and punctuation, so that
    "Ice Cream Cone (2 scoop)" and "Ice Cream Cone (3 Scoop)" share one."""
    return " ".join(re.findall(r"[^\W\d_]+", name.lower())) or name.lower()


def compose(name: str, description: str, keywords) -> str:
    caption = name.rstrip(" .")
    caption = caption[:1].upper() + caption[1:]
    if description:
        caption += ". " + description
    if keywords:
        caption += ". Keywords: " + ", ".join(keywords)
    return caption


def make_captions(svgs, words: frozenset[str]) -> tuple[list[Caption], list[tuple[str, str]]]:
    """(captions of the files kept, (path, reason) of the ones skipped), in ``svgs``' order."""
    titles = [clean_title(s.title) for s in svgs]
    title_counts = collections.Counter(_norm(t) for t in titles)
    junk_keywords = {t for t, n in title_counts.items() if n >= MAX_TITLE_REPEATS}
    names: list[tuple[str, str] | str] = []  # (name, source) or a skip reason
    for svg, title in zip(svgs, titles):
        if title and not is_boilerplate(title, svg.creator) and title_counts[_norm(title)] < MAX_TITLE_REPEATS:
            names.append((title, "title"))
            continue
        fallback = None if NO_FALLBACK.search(svg.title) else fallback_name(svg.path, svg.creator, words)
        names.append((fallback, "file name") if fallback else ("no title" if not title else "boilerplate title"))
    name_counts = collections.Counter(_norm(n[0]) for n in names if isinstance(n, tuple))
    desc_counts = collections.Counter(_norm(s.description) for s in svgs)
    kept, skipped = [], []
    for svg, named in zip(svgs, names):
        if isinstance(named, str):
            skipped.append((svg.path, named))
            continue
        name, source = named
        if source == "file name" and name_counts[_norm(name)] >= MAX_TITLE_REPEATS:
            skipped.append((svg.path, "boilerplate title"))
            continue
        description = clean_description(svg.description, name, desc_counts[_norm(svg.description)])
        keywords = clean_keywords(svg.keywords, name, svg.creator, junk_keywords)
        kept.append(Caption(svg, name, compose(name, description, keywords), caption_group(name), source))
    return kept, skipped
