"""declip_fast.data.clipart: the Openclipart image-text set (captions, rendering, splits, files).

The caption rules are tested on hand-written metadata; the build on a 40-file slice of the real
package (skipped without Debian's openclipart-svg and librsvg2-bin), built twice: every output
file must have the same bytes.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from declip_fast.data import clipart_meta as meta
from declip_fast.data.clipart_render import RenderError, crop_square
from declip_fast.data.clipart_split import assign_classes, folder_class, split_groups

HAVE_PACKAGES = shutil.which("rsvg-convert") is not None and Path("/usr/share/openclipart/svg").is_dir()
needs_packages = pytest.mark.skipif(
    not HAVE_PACKAGES, reason="needs Debian's openclipart-svg and librsvg2-bin (scripts/setup.sh installs them)"
)
SLICE = 40


def svg(title="", description="", keywords=(), creator="", license_="http://web.resource.org/cc/PublicDomain"):
    """An SVG with Openclipart's metadata layout (license_ None: no license statement)."""
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    lic = f'<cc:license rdf:resource="{license_}"/>' if license_ is not None else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:sodipodi="http://inkscape.sourceforge.net/DTD/sodipodi-0.dtd"
     sodipodi:docname="x.svg" width="10" height="10">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title><dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>{lic}
  </cc:Work></rdf:RDF></metadata>
  <rect x="1" y="1" width="8" height="8" fill="red"/>
</svg>""".encode()


@pytest.fixture(scope="module")
def words():
    try:
        return meta.english_words()
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_metadata_parse_junk_keywords_and_licenses():
    data = svg(
        "Owl on Branch",
        "HASH(0x850c64c)",
        ["owl", "hash(0x853b2b0)", "hash", "0x8863bcc", "Animal", "animal", "owl on branch", "john doe", "bird"],
        "John Doe",
    )
    parsed = meta.parse_svg("animals/birds/owl.svg", data)
    assert (parsed.title, parsed.creator) == ("Owl on Branch", "John Doe") and meta.is_public_domain(parsed)
    keywords = meta.clean_keywords(parsed.keywords, parsed.title, parsed.creator)
    assert keywords == ["owl", "animal", "bird"]  # junk, repeats, the title and the author gone
    assert meta.clean_description(parsed.description, parsed.title) == ""
    assert meta.compose("Owl on Branch", "", keywords) == "Owl on Branch. Keywords: owl, animal, bird"
    assert meta.clean_keywords(["north_america", "&eacute;toile", "rome,italy", "lemon_theme_icon", "11"]) == [
        "north america",
        "étoile",
        "rome",
        "italy",
    ]
    gpl = meta.parse_svg(
        "computer/firewall.svg", svg("Firewall", license_="http://creativecommons.org/licenses/GPL/2.0/")
    )
    assert not meta.is_public_domain(gpl)
    for license_ in (
        None,
        "http://creativecommons.org/licenses/publicdomain/",
        "http://creativecommons.org/publicdomain/zero/1.0/",
    ):
        assert meta.is_public_domain(meta.parse_svg("a.svg", svg("A", license_=license_)))
    # copies of one drawing that differ in metadata and editor file name share a digest
    other = svg("Other", keywords=["education"]).replace(b'docname="x.svg"', b'docname="y.svg"')
    assert meta.drawing_digest(other) == parsed.digest
    assert meta.drawing_digest(svg().replace(b'fill="red"', b'fill="blue"')) != parsed.digest


def test_descriptions_and_titles():
    assert meta.clean_description("A barn owl at night.", "Owl") == "A barn owl at night"
    for junk in ("jean.victor.balin@gmail.com", "EPS converted from http://aiga.org", "Owl", "owl!", "x" * 200):
        assert meta.clean_description(junk, "Owl") == ""
    assert meta.clean_description("A barn owl at night", "Owl", repeats=5) == ""
    assert meta.clean_title("Clipart by Nicu Buculei - compact_disc") == "compact disc"
    assert meta.clean_title("01_nomoon_openclipart") == "nomoon"
    assert meta.is_boilerplate("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)")
    assert meta.is_boilerplate("Lemon SVG theme") and meta.is_boilerplate("John Doe", "John Doe")
    assert not meta.is_boilerplate("Owl on Branch", "John Doe")
    assert meta.repair("LÃ©zard") == "Lézard" and meta.repair("Lézard") == "Lézard"  # UTF-8 read as Latin-1
    assert meta.caption_group("Ice Cream Cone (2 scoop)") == meta.caption_group("ice cream cone (3 Scoop)")


def test_captions_drop_boilerplate_and_use_file_names(words):
    def record(path, title, creator="", keywords=("shapes",)):
        return meta.parse_svg(path, svg(title, keywords=keywords, creator=creator))

    svgs = [record(f"shapes/stars/star_{i:02d}pt.svg", "gramastar") for i in range(6)]  # no name in the file
    svgs += [record(f"cards/bordered_{s}_k.svg", "card") for s in "cdhs"] + [record("cards/white_h_10.svg", "card")]
    svgs += [
        record(f"icons/flat-theme/action/{n}.svg", "Part of the Flat Icon Collection (x)") for n in ("copy", "cut")
    ]
    svgs += [
        record(f"food/fruit/{n}.svg", "Clipart by Nicu Buculei - pear")
        for n in ("apple", "banana", "cherries", "lemon", "x7")
    ]
    svgs += [record(f"weather/lightning_jon_phillips_{i:02d}.svg", "Lightning", "Jon Phillips") for i in range(5)]
    svgs += [record("animals/birds/owl.svg", "Owl on Branch", keywords=("owl", "hash(0x1)", "animal", "bird"))]
    svgs += [record("flags/africa/togo.svg", "")]
    kept, skipped = meta.make_captions(svgs, words)
    names = {c.svg.path: c.name for c in kept}
    assert names["cards/bordered_h_k.svg"] == "King of hearts" and names["cards/white_h_10.svg"] == "Ten of hearts"
    assert names["food/fruit/apple.svg"] == "Apple" and names["food/fruit/banana.svg"] == "Banana"
    assert names["flags/africa/togo.svg"] == "Togo"
    owl = next(c for c in kept if c.svg.path == "animals/birds/owl.svg")
    assert owl.caption == "Owl on Branch. Keywords: owl, animal, bird" and owl.group == "owl on branch"
    reasons = dict(skipped)
    assert all(reasons[f"shapes/stars/star_{i:02d}pt.svg"] == "boilerplate title" for i in range(6))
    assert reasons["icons/flat-theme/action/copy.svg"] == "boilerplate title"  # a collection without fallback
    assert reasons["food/fruit/x7.svg"] == "boilerplate title"  # no English word in the file name
    assert all(reasons[f"weather/lightning_jon_phillips_{i:02d}.svg"] == "boilerplate title" for i in range(5))
    assert len(kept) + len(skipped) == len(svgs)
    assert meta.fallback_name("a/dino_architetto_francesc_01.svg", "Architetto Francesco", words) is None
    assert meta.fallback_name("a/aiga_air_transportation1.svg", "", words) == "Air transportation"
    assert meta.fallback_name("a/bullet_hole_linda_kim_aa.svg", "Linda Kim", words) == "Bullet hole"


def test_collect_skips_bad_duplicate_and_gpl_files(tmp_path, words):
    from declip_fast.data.clipart import collect

    (tmp_path / "animals").mkdir()
    (tmp_path / "animals/owl.svg").write_bytes(svg("Owl", keywords=["bird"]))
    (tmp_path / "animals/owl_copy.svg").write_bytes(svg("Owl", keywords=["animal"]))  # same drawing
    (tmp_path / "animals/broken.svg").write_bytes(b"<svg><metadata><rdf:RDF>")
    (tmp_path / "animals/gpl.svg").write_bytes(
        svg("Firewall", license_="http://creativecommons.org/licenses/GPL/2.0/").replace(b"red", b"blue")
    )
    (tmp_path / "animals/link.svg").symlink_to(tmp_path / "animals/owl.svg")
    captions, skips = collect(tmp_path, workers=1)
    assert [(c.svg.path, c.caption) for c in captions] == [("animals/owl.svg", "Owl. Keywords: bird")]
    assert sorted(skips) == [
        ("animals/broken.svg", "unparseable SVG"),
        ("animals/gpl.svg", "license not public domain"),
        ("animals/link.svg", "duplicate drawing"),  # real files win over links
        ("animals/owl_copy.svg", "duplicate drawing"),
    ]


def test_crop_square_removes_margins():
    page = np.full((128, 100, 3), 255, np.uint8)
    page[40:60, 30:40] = (200, 0, 0)  # a small drawing on a large page
    square = crop_square(page, 64)
    assert square.shape == (64, 64, 3) and square.dtype == np.uint8
    assert square[32, 32, 1] < 60 and square[32, 2, 1] > 250  # filled centre, white sides (20x10 box)
    with pytest.raises(RenderError, match="blank"):
        crop_square(np.full((50, 50, 3), 250, np.uint8), 64)


def test_classes_and_splits_keep_groups_together():
    assert folder_class("signs_and_symbols/flags/europe/france/x.svg") == "flag"
    assert folder_class("people/bodypart/x.svg") is None and folder_class("people/x.svg") == "person"
    paths = [f"animals/mammals/{i}.svg" for i in range(30)] + [f"food/fruit/{i}.svg" for i in range(12)]
    paths += [f"unsorted/{i}.svg" for i in range(40)]
    classes, labels = assign_classes(paths, 10)
    assert classes == ["fruit", "mammal"] and labels.count(-1) == 40
    groups = [f"g{i // 3}" for i in range(len(paths))]  # groups of 3, a few spanning two folders
    split = split_groups(groups, labels, 0, 0.2, 0.1)
    assert split == split_groups(groups, labels, 0, 0.2, 0.1)  # deterministic
    by_group = {}
    for group, part in zip(groups, split):
        by_group.setdefault(group, set()).add("held" if part != "train" else part)
    assert all(len(parts) == 1 for parts in by_group.values())  # no group straddles
    for label in (0, 1):
        held = sum(s == "test" and x == label for s, x in zip(split, labels))
        assert 1 <= held < labels.count(label)
    assert split.count("retrieval") >= 8


def test_missing_packages_is_one_line(tmp_path, capsys, monkeypatch):
    from declip_fast.cli import main

    with pytest.raises(SystemExit):  # one output kind at a time
        main(["write-dataset", "--clipart", str(tmp_path / "a"), "--demo", str(tmp_path / "b")])
    capsys.readouterr()
    monkeypatch.setenv("DECLIP_FAST_OPENCLIPART", str(tmp_path / "nowhere"))
    assert main(["write-dataset", "--clipart", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "openclipart-svg librsvg2-bin" in err
    monkeypatch.setenv("DECLIP_FAST_OPENCLIPART", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert main(["write-dataset", "--clipart", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rsvg-convert not found" in err and "librsvg2-bin" in err


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """The 40-file slice built twice: by the CLI and by the library."""
    pytest.importorskip("ffcv")
    from declip_fast.cli import main
    from declip_fast.data.clipart import ensure_clipart_data

    first, second = tmp_path_factory.mktemp("clip1"), tmp_path_factory.mktemp("clip2")
    args = ["write-dataset", "--clipart", str(first), "--limit", str(SLICE), "--workers", "2", "--quiet"]
    assert main(args) == 0
    paths = ensure_clipart_data(second, limit=SLICE, workers=2)
    return first, second, paths, args


@needs_packages
def test_slice_is_byte_identical_and_complete(slices, capsys):
    from declip_fast.cli import main

    first, second, paths, args = slices
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file() and p.name != ".lock")
    assert {"train.beton", "test.beton", "test_labels.npy", "classes.json", "retrieval.csv"} <= {str(f) for f in files}
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    capsys.readouterr()
    assert main(args) == 0 and "already built" in capsys.readouterr().out  # complete: a no-op
    stats = paths.stats
    assert stats["rendered"] == SLICE and stats["kept"] + stats["skipped_by_reason"].get("blank render", 0) <= SLICE
    assert stats["skipped_by_reason"]["license not public domain"] >= 2  # the GPL files
    assert stats["written"] == {"train": stats["splits"]["train"], "test": stats["splits"]["test"]}


@needs_packages
def test_slice_splits_labels_and_readers(slices):
    from declip_fast.eval.retrieval import read_pairs

    _, _, paths, _ = slices
    rows = list(csv.DictReader(paths.pairs.open(encoding="utf-8")))
    by_group: dict = {}
    for row in rows:
        by_group.setdefault(row["group"], set()).add("train" if row["split"] == "train" else "held out")
    assert all(len(parts) == 1 for parts in by_group.values())  # no caption group straddles train/test
    manifest = json.loads(paths.classes.read_text(encoding="utf-8"))
    labels = np.load(paths.test_labels)
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [manifest["classes"][y] for y in labels] == [r["class"] for r in test_rows]
    assert set(manifest["prompts"]) == set(manifest["classes"]) and manifest["build"]["limit"] == SLICE
    held = read_pairs(paths.retrieval)  # what `declip-fast eval --retrieval` reads
    assert len(held.captions) == sum(r["split"] == "retrieval" for r in rows) == len(held.images)
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    enabled = Compiler.is_enabled
    Compiler.set_enabled(False)
    try:
        pipelines = {"image": [SimpleRGBImageDecoder()], "tokens": [NDArrayDecoder()], "index": [IntDecoder()]}
        pipelines["eda_tokens"] = [NDArrayDecoder()]
        loader = Loader(
            str(paths.test),
            batch_size=64,
            num_workers=1,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            pipelines=pipelines,
        )
        images, _, _, index = [np.array(x, copy=True) for x in next(iter(loader))]
    finally:
        Compiler.set_enabled(enabled)
    assert images.shape == (len(labels), 64, 64, 3) and index.ravel().tolist() == list(range(len(labels)))
    assert images.mean() > 100  # drawings on white, not black frames
