"""declip_fast.data.write (pairs -> .beton), the demo builder and the CLI entry.

Files are read back two ways: FFCV's ``Reader`` plus raw bytes (any image sizes), and FFCV's
``Loader`` (equal-size images, the path the trainer uses). Images are compared with the source
after the same shrink, up to JPEG loss; tokens must equal ``tokenize`` exactly.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ffcv")
cv2 = pytest.importorskip("cv2")
from PIL import Image  # noqa: E402

from declip_fast.cli import main  # noqa: E402
from declip_fast.data import write  # noqa: E402
from declip_fast.data.tokenizer import tokenize  # noqa: E402
from declip_fast.data.write import (  # noqa: E402
    CONTEXT_LENGTH,
    EDA_VARIANTS,
    WriteConfig,
    eda_variants,
    write_dataset,
)

SMALL_PAGE = 1 << 21  # FFCV's smallest page: 2 MiB files instead of 16 MiB
JPEG_MAD = 2.5  # mean |difference| (0..255) q90 JPEG + filter leave on these smooth images; measured <= 1.1


def config(**kw) -> WriteConfig:
    return WriteConfig(**{"workers": 1, "progress": False, "page_size": SMALL_PAGE, "max_side": 32, **kw})


def make_image(i: int, height: int = 24, width: int = 20) -> np.ndarray:
    """A smooth colour image, different per i (so a swapped row is caught)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = [(15 * i) % 100 + 2 * x, 40 + (7 * i) % 50 + 2 * y, np.full_like(x, (200 - 29 * i) % 256)]  # no wrap
    return np.stack(rgb, axis=-1).astype(np.uint8)


def fitted(image: np.ndarray, max_side: int) -> np.ndarray:
    """The source shrunk as FFCV's writer would (its size rule and INTER_AREA filter)."""
    h, w = image.shape[:2]
    ratio = max_side / max(h, w)
    if ratio >= 1:
        return image
    return cv2.resize(image, (int(ratio * w), int(ratio * h)), interpolation=cv2.INTER_AREA)


def read_beton(path) -> list[dict]:
    """Every sample of a .beton via FFCV's Reader and the raw bytes (images of any size)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.reader import Reader

    reader = Reader(str(path))
    assert reader.field_names == list(write.FIELDS)
    kinds = [type(reader.handlers[n]) for n in reader.field_names]
    assert kinds == [RGBImageField, NDArrayField, NDArrayField, IntField]
    raw = np.fromfile(path, np.uint8)
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    samples = []
    for row in reader.metadata:
        ptr = int(row["f0"]["data_ptr"])
        image = cv2.cvtColor(cv2.imdecode(raw[ptr : ptr + size_at[ptr]], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert image.shape[:2] == (row["f0"]["height"], row["f0"]["width"])
        tokens = raw[int(row["f1"]) :][: CONTEXT_LENGTH * 4].view(np.int32)
        eda = raw[int(row["f2"]) :][: EDA_VARIANTS * CONTEXT_LENGTH * 4].view(np.int32)
        samples.append(
            {
                "image": image,
                "tokens": tokens,
                "index": int(row["f3"]),
                "eda_tokens": eda.reshape(EDA_VARIANTS, CONTEXT_LENGTH),
            }
        )
    return samples


def check_pairs(samples, expected) -> None:
    """``expected``: (source image before shrinking, caption, source position) per written row."""
    assert [s["index"] for s in samples] == list(range(len(expected)))
    captions = [caption for _, caption, _ in expected]
    np.testing.assert_array_equal(np.stack([s["tokens"] for s in samples]), tokenize(captions).numpy())
    refs = [fitted(image, 32).astype(float) for image, _, _ in expected]
    for row, (sample, (_, caption, position)) in enumerate(zip(samples, expected)):
        views = eda_variants(caption, position)
        np.testing.assert_array_equal(sample["eda_tokens"], tokenize(views).numpy())
        assert sample["image"].shape == refs[row].shape
        errors = [np.abs(sample["image"] - ref).mean() if ref.shape == refs[row].shape else np.inf for ref in refs]
        assert errors[row] < JPEG_MAD and int(np.argmin(errors)) == row


def save(image: np.ndarray, path: Path, fmt: str | None = None) -> Path:
    Image.fromarray(image).save(path, format=fmt)
    return path


def test_csv_round_trip_with_header_relative_and_absolute_paths(tmp_path):
    (tmp_path / "img").mkdir()
    expected, lines = [], ["image,caption"]
    for i in range(10):
        image = make_image(i, 24 + 4 * i, 20 + 3 * i)  # up to 60 x 47: most get shrunk to 32
        path = save(image, tmp_path / "img" / f"{i}.png")
        caption = f"a photo of a small red car, number {i}, parked near the old bridge"
        lines.append(f'{path if i % 3 == 0 else Path("img") / path.name},"{caption}"')
        expected.append((image, caption, i))
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    summary = write_dataset(tmp_path / "pairs.csv", tmp_path / "out.beton", config(workers=2, chunk_size=3))
    assert (summary.written, summary.skipped) == (10, 0)
    samples = read_beton(tmp_path / "out.beton")
    check_pairs(samples, expected)
    assert max(max(s["image"].shape[:2]) for s in samples) == 32
    # the stored EDA views are real variants, not copies of the caption
    assert any((s["eda_tokens"] != s["tokens"]).any() for s in samples)


def test_headerless_tsv_and_identical_files_whatever_the_worker_count(tmp_path):
    rows = []
    for i in range(9):
        save(make_image(i), tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg\ta dog running on the beach at sunset {i}")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    one = write_dataset(tmp_path / "pairs.tsv", tmp_path / "one.beton", config(workers=1))
    two = write_dataset(tmp_path / "pairs.tsv", tmp_path / "two.beton", config(workers=2, chunk_size=2))
    assert one.written == two.written == 9
    assert (tmp_path / "one.beton").read_bytes() == (tmp_path / "two.beton").read_bytes()
    assert tokenize("a dog running on the beach at sunset 0").numpy().ravel().tolist() == (
        read_beton(tmp_path / "one.beton")[0]["tokens"].tolist()
    )


def test_folder_source_recursive_with_unpaired_files(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    expected = []
    for i, rel in enumerate(["a", "b", "sub/c"]):
        image = make_image(i)
        save(image, root / f"{rel}.png")
        (root / f"{rel}.txt").write_text(f"  caption of {rel}\n")
        (root / f"{rel}.json").write_text("{}")  # metadata files are ignored
        expected.append((image, f"caption of {rel}", i + (rel == "sub/c")))  # EDA seeds: source position
    save(make_image(7), root / "lonely.jpg")  # no caption: skipped while preparing, after b, before sub/c
    (root / "orphan.txt").write_text("no image")
    summary = write_dataset(root, tmp_path / "out.beton", config())
    check_pairs(read_beton(tmp_path / "out.beton"), expected)
    assert sorted((Path(s.source).name, s.reason) for s in summary.skips) == [
        ("lonely", "missing caption"),
        ("orphan", "missing image"),
    ]


def make_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            jpeg = io.BytesIO()
            Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
            for name, data in (
                (f"{key}.jpg", jpeg.getvalue()),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", b"{}"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_folder_and_single_tar(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = []
    for s in range(2):
        samples = [(f"{s:05d}{k:04d}", make_image(4 * s + k), f"shard {s} sample {k}") for k in range(4)]
        make_shard(shards / f"{s:05d}.tar", samples)
        expected += [(image, caption, len(expected) + k) for k, (_, image, caption) in enumerate(samples)]
    summary = write_dataset(shards, tmp_path / "all.beton", config(workers=2, chunk_size=3))
    assert (summary.written, summary.skipped) == (8, 0)
    check_pairs(read_beton(tmp_path / "all.beton"), expected)
    single = write_dataset(shards / "00001.tar", tmp_path / "one.beton", config())
    assert single.written == 4
    np.testing.assert_array_equal(
        read_beton(tmp_path / "one.beton")[0]["tokens"], tokenize("shard 1 sample 0").numpy()[0]
    )


def test_cut_tar_shard_keeps_complete_samples(tmp_path):
    make_shard(tmp_path / "s.tar", [(f"k{k}", make_image(k, 64, 64), f"sample {k}") for k in range(3)])
    data = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = {m.name: m for m in tar}
    k1_jpg, k1_txt = members["k1.jpg"], members["k1.txt"]
    # a download cut inside k1's image (its caption never arrives), or inside k1's caption
    for n, (cut, reason) in enumerate(
        [(k1_jpg.offset_data + k1_jpg.size // 2, "missing caption"), (k1_txt.offset_data + 4, "truncated caption")]
    ):
        (tmp_path / f"cut{n}").mkdir()
        (tmp_path / f"cut{n}" / "s.tar").write_bytes(data[:cut])
        summary = write_dataset(tmp_path / f"cut{n}", tmp_path / f"out{n}.beton", config())
        got = {s.source.split(":")[-1] if ":" in s.source else "shard": s.reason for s in summary.skips}
        assert summary.written == 1 and got.pop("k1") == reason  # the complete sample k0 is kept
        assert all(r.startswith("unreadable tar") for r in got.values())  # tarfile may notice the cut
        samples = read_beton(tmp_path / f"out{n}.beton")
        np.testing.assert_array_equal(samples[0]["tokens"], tokenize("sample 0").numpy()[0])


def corrupt_source(tmp_path: Path) -> tuple[Path, dict, list[str]]:
    """A CSV mixing good pairs and every kind of bad input; (csv, source name -> reason, kept captions)."""
    good = save(make_image(1), tmp_path / "good.png")
    jpeg = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, format="JPEG")
    # cut inside the scan data, as a partial download is (PIL would load it with LOAD_TRUNCATED_IMAGES)
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 4])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image at all")
    save(make_image(3), tmp_path / "png_named.jpg", fmt="PNG")  # wrong extension, fine content
    rows = [
        (good, b"a good caption"),
        (tmp_path / "truncated.jpg", b"cut jpeg"),
        (tmp_path / "empty.jpg", b"zero bytes"),
        (tmp_path / "missing.jpg", b"no such file"),
        (tmp_path / "text.jpg", b"not an image"),
        (tmp_path / "png_named.jpg", b"a png named jpg"),
        (good, b"caf\xe9 latin-1 bytes"),
        (good, b""),
        (good, b"   \t "),
    ]
    table = b"image,caption\n" + b"".join(str(p).encode() + b',"' + c + b'"\n' for p, c in rows)
    (tmp_path / "pairs.csv").write_bytes(table)
    reasons = {
        "truncated.jpg": "truncated image",
        "empty.jpg": "empty image file",
        "missing.jpg": "missing image",
        "text.jpg": "not an image",
        "pairs.csv:8 ": "caption not utf-8",
        "pairs.csv:9 ": "empty caption",
        "pairs.csv:10 ": "empty caption",
    }  # file line numbers: the header is line 1
    return tmp_path / "pairs.csv", reasons, ["a good caption", "a png named jpg"]


def test_corrupt_inputs_are_skipped_and_counted_via_cli(tmp_path, capsys):
    source, reasons, kept = corrupt_source(tmp_path)
    out, report = tmp_path / "out.beton", tmp_path / "summary.json"
    assert (
        main(
            [
                "write-dataset",
                str(source),
                str(out),
                "--summary-json",
                str(report),
                "--workers",
                "2",
                "--max-side",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(report.read_text())
    assert (summary["written"], summary["skipped"]) == (2, len(reasons))
    assert summary["pairs_per_s"] > 0
    got = {}
    for skip in summary["skips"]:
        name = next(n for n in reasons if n in skip["source"])
        got[name] = skip["reason"]
    assert got == reasons
    samples = read_beton(out)
    np.testing.assert_array_equal(np.stack([s["tokens"] for s in samples]), tokenize(kept).numpy())
    assert np.abs(samples[1]["image"] - make_image(3).astype(float)).mean() < JPEG_MAD
    printed = capsys.readouterr().out
    assert "written: 2" in printed and "truncated image: 1" in printed and "pairs/s" in printed


def test_bad_caption_files_in_a_folder(tmp_path):
    (tmp_path / "src").mkdir()
    for name, caption in (("ok", b"fine"), ("latin", b"\xe9t\xe9"), ("blank", b" \n")):
        save(make_image(0), tmp_path / "src" / f"{name}.png")
        (tmp_path / "src" / f"{name}.txt").write_bytes(caption)
    summary = write_dataset(tmp_path / "src", tmp_path / "out.beton", config())
    assert summary.written == 1
    assert sorted((Path(s.source).name, s.reason) for s in summary.skips) == [
        ("blank", "empty caption"),
        ("latin", "caption not utf-8"),
    ]


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    rows = []
    for i in range(8):
        save(make_image(i), tmp_path / f"{i}.png")
        rows.append(f"{i}.png,caption {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows))
    before = sorted(os.listdir(tmp_path))
    append = write._BetonFile.append

    def failing_append(self, prepared):
        if self.count == 3:
            raise RuntimeError("disk on fire")
        append(self, prepared)

    monkeypatch.setattr(write._BetonFile, "append", failing_append)
    for workers in (1, 2):
        with pytest.raises(RuntimeError, match="disk on fire"):
            write_dataset(tmp_path / "pairs.csv", tmp_path / "out.beton", config(workers=workers, chunk_size=2))
        assert sorted(os.listdir(tmp_path)) == before  # no OUT.beton, no temporary left behind
    # an interrupted overwrite keeps the old file as it was
    (tmp_path / "out.beton").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "pairs.csv", tmp_path / "out.beton", config(overwrite=True))
    assert (tmp_path / "out.beton").read_bytes() == b"old"
    monkeypatch.undo()
    assert write_dataset(tmp_path / "pairs.csv", tmp_path / "out.beton", config(overwrite=True)).written == 8


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    save(make_image(0), tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text("a.png,a caption\n")
    out = tmp_path / "out.beton"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "pairs.csv", out, config())
    assert main(["write-dataset", str(tmp_path / "pairs.csv"), str(out), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert (
        main(["write-dataset", str(tmp_path / "pairs.csv"), str(out), "--quiet", "--overwrite", "--workers", "1"]) == 0
    )
    assert len(read_beton(out)) == 1


def test_limit_and_no_valid_pairs(tmp_path):
    rows = []
    for i in range(6):
        save(make_image(i), tmp_path / f"{i}.png")
        rows.append(f"{i}.png,caption {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows))
    summary = write_dataset(tmp_path / "pairs.csv", tmp_path / "few.beton", config(limit=4, workers=2, chunk_size=1))
    assert summary.written == 4 and [s["index"] for s in read_beton(tmp_path / "few.beton")] == [0, 1, 2, 3]
    (tmp_path / "bad.csv").write_text("nothing.png,caption\n")
    with pytest.raises(write.NoPairsError) as err:
        write_dataset(tmp_path / "bad.csv", tmp_path / "none.beton", config())
    assert err.value.summary.skips[0].reason == "missing image" and not (tmp_path / "none.beton").exists()


def test_read_idx_plain_and_gzipped(tmp_path):
    from declip_fast.data.demo import read_idx

    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = b"\0\0\x08\x03" + np.array([2, 3, 4], ">u4").tobytes() + array.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(data)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    labels = np.array([1, -2, 70000], ">i4")
    (tmp_path / "l").write_bytes(b"\0\0\x0c\x01" + np.array([3], ">u4").tobytes() + labels.tobytes())
    assert read_idx(tmp_path / "l").tolist() == [1, -2, 70000]


def load_all(path) -> list[np.ndarray]:
    """Every field of a .beton through FFCV's Loader, in file order (equal-size images only)."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    enabled = Compiler.is_enabled
    Compiler.set_enabled(False)  # no numba compilation: tiny epochs
    try:
        loader = Loader(
            str(path),
            batch_size=16,
            num_workers=1,
            order=OrderOption.SEQUENTIAL,
            drop_last=False,
            pipelines={
                "image": [SimpleRGBImageDecoder()],
                "tokens": [NDArrayDecoder()],
                "eda_tokens": [NDArrayDecoder()],
                "index": [IntDecoder()],
            },
        )
        batches = [[np.array(x, copy=True) for x in batch] for batch in loader]  # buffers are reused
    finally:
        Compiler.set_enabled(enabled)
    return [np.concatenate(parts) for parts in zip(*batches)]


def test_demo_builds_both_splits_and_classes(tmp_path, capsys):
    from declip_fast.data import demo

    try:
        demo.load_fashion_mnist("test")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert (
        main(
            [
                "write-dataset",
                "--demo",
                str(tmp_path),
                "--train-size",
                "48",
                "--test-size",
                "24",
                "--workers",
                "2",
                "--quiet",
                "--summary-json",
                str(tmp_path / "s.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["train"]["written"] == 48
    paths = demo.ensure_demo_data(tmp_path, train_size=48, test_size=24)
    assert paths.summaries == {}  # already there: nothing rebuilt
    meta = json.loads(paths.classes.read_text())
    assert meta["classes"] == list(demo.CLASSES) and len(meta["classes"]) == 10
    assert all("{}" in t for t in meta["templates"]) and meta["prompts"]["ankle boot"][0] == "a photo of an ankle boot."
    for split, size in (("train", 48), ("test", 24)):
        images, tokens, eda_tokens, index = load_all(getattr(paths, split))
        sources, labels, captions = demo.subset(split, size)
        np.testing.assert_array_equal(np.load(getattr(paths, f"{split}_labels")), labels)
        assert index.ravel().tolist() == list(range(size)) and eda_tokens.shape == (size, EDA_VARIANTS, 77)
        np.testing.assert_array_equal(tokens, tokenize(captions).numpy())
        assert all(demo.with_articles(demo.CLASSES[y]).split()[-1] in c for y, c in zip(labels, captions))
        assert images.shape == (size, 64, 64, 3) and (images[..., 0] == images[..., 2]).all()  # gray as RGB
        small = np.stack([cv2.resize(im, (28, 28), interpolation=cv2.INTER_AREA) for im in images[..., 0]])
        assert np.abs(small.astype(float) - sources).mean() < 6  # the real images, in order
        assert len(set(captions)) > size // 4  # templates vary
    # other parameters: rebuilt
    assert demo.ensure_demo_data(tmp_path, train_size=30, test_size=24).summaries["train"].written == 30


def test_cli_bench_and_usage_errors(tmp_path, capsys, monkeypatch):
    import declip_fast.cli as cli

    assert main(["bench", "--help"]) == 0  # the benchmark runner's usage, from this checkout
    monkeypatch.setattr(cli, "_checkout", lambda: None)  # an installed wheel, no checkout around
    assert main(["bench"]) == 2
    assert capsys.readouterr().err.startswith("error: declip-fast bench runs the benchmarks of a source checkout")
    assert main(["train", "demo", "optim.lrr=1"]) == 2  # an unknown key stops before any work
    assert "optim.lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["write-dataset", str(tmp_path)])  # SOURCE without OUT
    with pytest.raises(SystemExit):
        main(["write-dataset", "a.csv", "b.beton", "--demo", str(tmp_path)])


@pytest.mark.parametrize("shape, max_side", [((200, 150), 32), ((61, 300), 40), ((45, 45), 32), ((10, 7), 32)])
def test_fit_follows_ffcv_size_rule(shape, max_side):
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.stack([x * 255 // shape[1], y * 255 // shape[0], (x + y) * 100 // sum(shape)], -1).astype(np.uint8)
    out = write._fit(image, max_side, upscale=False)
    reference = fitted(image, max_side)  # FFCV: INTER_AREA straight to the size
    assert out.shape == reference.shape and out.dtype == np.uint8
    if max_side / max(shape) < 0.5:  # FFCV's filter
        np.testing.assert_array_equal(out, reference)
    else:  # bicubic: on a smooth image, within rounding of the area average
        assert np.abs(out.astype(float) - reference).mean() < 1.5
    up = write._fit(image, 64, upscale=True)
    assert up.shape == (int(64 / max(shape) * shape[0]), int(64 / max(shape) * shape[1]), 3) or max(shape) > 64
