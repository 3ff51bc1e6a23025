"""The FFCV loader never hangs and never serves garbage, and its resume is exact under load.

- an exception in FFCV's loader thread is raised by the consumer within seconds
  (``LoaderThreadError``), instead of leaving it waiting on the thread's queue forever;
- images libjpeg-turbo refuses are dropped from their batch and counted (``loader.skipped``);
- a ``.beton`` whose header, tables or pointers do not fit the file is refused at open with a
  one-line ``ValueError`` naming the file and the fault;
- the seeded crops share no state with other threads, so exact resume holds while other loaders
  and processes compete for the CPU (the slow test runs it beside busy processes).

Damaged files are a small valid file written by ``declip_fast.data.write`` with bytes changed at
places read from FFCV's layout (header, metadata records, allocation table). FFCV's compiler is
off (tiny epochs), as in tests/data.
"""

import logging
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from declip_fast.data import augment as A  # noqa: E402
from declip_fast.data import loader as L  # noqa: E402
from declip_fast.data.beton import LoaderThreadError  # noqa: E402
from tests.data.test_resume import _assert_same, _loader  # noqa: E402

N, BATCH, SIZE = 32, 8, 16
pytestmark = pytest.mark.usefixtures("ffcv_uncompiled")  # tiny epochs: tests/conftest.py
NO_COLOUR = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """A valid 32-pair .beton from the project's writer (images 24-40 px)."""
    from declip_fast.data.sources import Pair
    from declip_fast.data.write import WriteConfig, write_pairs

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(N):
        h, w = rng.integers(24, 40, size=2)
        base = rng.integers(0, 256, size=(1, 1, 3))
        image = np.clip(base + rng.normal(0, 50, size=(h, w, 3)), 0, 255).astype(np.uint8)
        pairs.append(Pair(f"pair {i}", image, f"a photo of a thing number {i} by the river"))
    path = tmp_path_factory.mktemp("beton") / "good.beton"
    cfg = WriteConfig(workers=1, progress=False, page_size=1 << 21, max_side=48)
    write_pairs(pairs, path, cfg)
    return path


def _config(path, **kw):
    kw = {"batch_size": BATCH, "image_size": SIZE, "num_workers": 1, "seed": 1, **kw}
    return L.DataConfig(beton=str(path), backend="ffcv", **kw)


def _layout(path):
    """(metadata start, metadata dtype, allocation table) of a valid file, from FFCV's reader."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    reader = Reader(str(path))
    return HeaderType.itemsize + reader.field_descriptors.nbytes, reader.metadata_type, reader.alloc_table


def _damaged(beton, tmp_path, damage):
    path = tmp_path / "damaged.beton"
    shutil.copy(beton, path)
    damage(path, *_layout(path))
    return path


def _header(path, **values):
    from ffcv.types import HeaderType

    header = np.memmap(path, dtype=HeaderType, mode="r+", shape=(1,))
    for key, value in values.items():
        header[key][0] = value(int(header[key][0]), path.stat().st_size)
    header.flush()


def _record(path, meta_start, meta_type, row, field, key, value):
    meta = np.memmap(path, dtype=meta_type, mode="r+", offset=meta_start, shape=(N,))
    meta[field][key][row] = value(path.stat().st_size)
    meta.flush()


def _image_bytes(path, meta_start, meta_type, row):
    """(offset, length) of sample ``row``'s JPEG in the file."""
    meta = np.memmap(path, dtype=meta_type, mode="r", offset=meta_start, shape=(N,))
    ptr = int(meta["f0"]["data_ptr"][row])
    table = _layout(path)[2]
    return ptr, int(table["size"][table["ptr"] == ptr][0])


# -- the loader thread ---------------------------------------------------------------------------


def _in_thread(fn, timeout):
    """(finished, result or exception) of ``fn()`` run in a daemon thread for at most ``timeout`` s:
    a hang fails the test instead of the session."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as err:
            out["result"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive(), out.get("result")


def test_an_exception_in_the_loader_thread_reaches_the_consumer(beton):
    loader = L.build_loader(_config(beton), "cpu")
    stages, outputs = loader._loader.code
    calls = []

    def failing(stage):
        def run(**kw):  # the third batch's first pipeline stage fails
            calls.append(1)
            if len(calls) == 3:
                raise OSError("disk on fire\nsecond line")
            return stage(**kw)

        return run

    loader._loader.code = ([(failing(stages[0][0]), stages[0][1]), *stages[1:]], outputs)
    finished, error = _in_thread(lambda: list(loader), timeout=20)  # the deadline only catches a hang
    assert finished, "the consumer hung on FFCV's queue"
    # The thread's own exception, handed over on the queue: not the consumer's fallback for a thread
    # that died without a word ("ended without a batch or an error", noticed by polling).
    assert isinstance(error, LoaderThreadError), error
    assert str(error) == f"{beton}: FFCV's loader thread failed: OSError: disk on fire"
    assert isinstance(error.__cause__, OSError)
    finished, batches = _in_thread(lambda: list(loader), timeout=20)  # the loader still works after
    assert finished and len(batches) == N // BATCH


# -- undecodable samples -------------------------------------------------------------------------


def _break_images(path, meta_start, meta_type, _table):
    rng = np.random.default_rng(5)
    with open(path, "r+b") as f:
        for row, keep in ((3, 0.0), (10, 0.5), (17, 0.2)):  # random bytes; scrambled after a head
            ptr, length = _image_bytes(path, meta_start, meta_type, row)
            head = int(keep * length)
            f.seek(ptr + head)
            f.write(rng.integers(0, 256, length - head, dtype=np.uint8).tobytes())


def test_undecodable_images_are_skipped_and_counted(beton, tmp_path, caplog):
    path = _damaged(beton, tmp_path, _break_images)
    kw = {"augment": NO_COLOUR, "mlm": False, "eda": False}
    loader = L.build_loader(_config(path, **kw), "cpu")
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == sorted(set(range(N)) - {3, 10, 17})
    assert loader.skipped == 3 and loader.stats() == {"skipped": 3}
    assert f"skipping sample 3 of {path}: undecodable image" in caplog.text
    assert all(len(b["images_1"]) == len(b["images_2"]) == len(b["text_1"]) == len(b["index"]) for b in batches)
    # The kept samples are the intact file's images, bit for bit (crops are seeded per batch).
    intact = list(L.build_loader(_config(beton, **kw), "cpu"))
    by_index = {int(i): img for b in intact for i, img in zip(b["index"], b["images_1"])}
    for b in batches:
        for i, img in zip(b["index"], b["images_1"]):
            assert torch.equal(img, by_index[int(i)])


# -- files that do not fit -----------------------------------------------------------------------


DAMAGE = {
    "1000x the samples": (
        lambda p, *_: _header(p, num_samples=lambda n, _: 1000 * n),  # in the slack
        "sample 32 (of 31968 such) points to no allocated region",
    ),
    "a billion x the samples": (
        lambda p, *_: _header(p, num_samples=lambda n, _: 10**9 * n),
        "the header claims 32000000000 samples of",
    ),
    "table past the end": (
        lambda p, *_: _header(p, alloc_table_ptr=lambda _, size: size + 24),
        "the allocation table at byte",
    ),
    "pointer past the end": (
        lambda p, s, t, _: _record(p, s, t, 5, "f0", "data_ptr", lambda size: size + 4096),
        "sample 5 (of 1 such) points to no allocated region",
    ),
    "zero height": (
        lambda p, s, t, _: _record(p, s, t, 7, "f0", "height", lambda _: 0),
        "sample 7 (of 1 such) has an image with a zero dimension",
    ),
    "region past the end": (lambda p, *_: _alloc_size(p, 1 << 40), "lies outside the data region"),
    "cut short": (lambda p, *_: _truncate(p), "the allocation table at byte"),
}


def _alloc_size(path, size):
    """Allocation 2 claims ``size`` bytes: its region runs past the end of the file."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    table_ptr = int(np.fromfile(path, dtype=HeaderType, count=1)[0]["alloc_table_ptr"])
    table = np.memmap(path, dtype=ALLOC_TABLE_TYPE, mode="r+", offset=table_ptr)
    table["size"][2] = size
    table.flush()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("fault", DAMAGE)
def test_a_beton_that_does_not_fit_its_file_is_refused_at_open(beton, tmp_path, fault):
    damage, message = DAMAGE[fault]
    path = _damaged(beton, tmp_path, damage)
    with pytest.raises(ValueError) as refused:
        L.build_loader(_config(path), "cpu")
    text = str(refused.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


# -- the seeded crops ----------------------------------------------------------------------------


def test_the_crops_leave_numpys_global_generator_alone(beton):
    """Seeding numpy's process-wide generator in the loader thread (the old fused decoder without
    FFCV's compiler) changed the trainer's draws, and let two loaders' threads change each other's
    crops: the cause of the flaky exact resume."""
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    list(L.build_loader(_config(beton, num_workers=2), "cpu"))
    assert np.array_equal(np.random.get_state()[1], before)


@pytest.mark.slow
def test_exact_resume_holds_beside_a_cpu_hog(data):
    """tests/data/test_resume's restart check, 3 times, while busy processes load both cores and
    the killed loader's thread still decodes ahead beside the restarted one."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(3):
            killed = _loader(data, "ffcv")
            batches = iter(killed)
            for _ in range(5):
                next(batches)
            restarted = _loader(data, "ffcv")
            restarted.load_state_dict(killed.state_dict())
            _assert_same(list(restarted), list(batches))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
