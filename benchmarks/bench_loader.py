"""Loader throughput: the FFCV loader vs the torch fallback, two views at 224 px, same images.

Images: neither scikit-image nor scikit-learn is installed, so the photos are built from real
Fashion-MNIST images (Debian's ``dataset-fashion-mnist``): each 500x375 RGB picture is a 4x3 grid
of 12 different items, upscaled (bicubic) to 125 px cells, each tinted with its own colour over
a coloured vertical gradient, plus Gaussian noise (sigma 6) so that the JPEGs carry photo-like
entropy (quality 90, ~48 kB each; a bare upscaled item compresses to a few kB and would decode
unrealistically fast). Captions: the demo's templates with one item's class name.

The fallback reads the JPEG files through a CSV. FFCV reads ``.beton`` files that
``declip_fast.data.write`` made from that CSV, twice: ``ffcv`` with ``max_side=512`` (no
shrinking: the same 500x375 pixels as the fallback decodes) and ``ffcv@384`` with the writer's
default ``max_side=384`` (what a user gets: images are stored smaller once, at write time);
``ffcv 2-pipe`` is ``ffcv`` with two pipelines on the image field instead of the fused two-view
decoder (each JPEG decoded twice), timed in the ``full`` setting only (to stay under 3 minutes).
All loaders: 2 workers (FFCV: threads; fallback: processes), batch 64, device CPU, all contract
keys (two image views, MLM, EDA text view). Two settings:

- ``full``: the MoCo-v2 colour augmentations run batched on the CPU in the main process, as in
  a CPU-only job (with a GPU they run on the GPU);
- ``crop``: colour augmentation probabilities at 0 (crop, flip, normalize only): the work a
  loader must do before a GPU takes over.

A round is one epoch of every (loader, setting), back to back, so that a load burst on this
shared 2-core box hits all of them; one warm-up round first (FFCV compiles its pipeline, the
fallback starts its workers). Reported: samples/s of each one's best epoch (the least disturbed),
per core (divided by the 2 workers' cores), and CPU time per sample (main process, its threads and
worker processes, from /proc: less sensitive to other jobs than wall time), plus the FFCV /
fallback ratio of samples/s.
"""

from __future__ import annotations

import collections
import csv
import os
import statistics
import time

import numpy as np
import pytest
import torch

from declip_fast.data.augment import AugmentConfig
from declip_fast.data.loader import DataConfig, build_loader

pytest.importorskip("ffcv")

N_SAMPLES = 384
BATCH = 64
WORKERS = 2
ROUNDS = 3
WIDTH, HEIGHT, GRID = 500, 375, (4, 3)
SETTINGS = {"full": AugmentConfig(), "crop": AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)}
LOADERS = {  # name: (backend, beton, FFCV's fused two-view decoder)
    "ffcv": ("ffcv", "beton", True),
    "ffcv 2-pipe": ("ffcv", "beton", False),
    "ffcv@384": ("ffcv", "beton384", True),
    "fallback": ("torch", None, True),
}


def cpu_seconds(root: int | None = None) -> float:
    """user + system CPU seconds of a process, its threads and all its live descendants."""
    tick, children, cpu = os.sysconf("SC_CLK_TCK"), collections.defaultdict(list), {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children[int(fields[1])].append(int(name))
        cpu[int(name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root or os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def _photo(items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 500x375 RGB picture from 12 Fashion-MNIST items (see the module docstring)."""
    import cv2

    cols, rows = GRID
    cell_w, cell_h = WIDTH // cols, HEIGHT // rows
    top, bottom = rng.uniform(40, 220, size=(2, 3))
    ramp = np.linspace(0, 1, HEIGHT)[:, None, None]
    canvas = np.broadcast_to(top + (bottom - top) * ramp, (HEIGHT, WIDTH, 3)).copy()
    for k, item in enumerate(items):
        r, c = divmod(k, cols)
        cell = cv2.resize(item, (cell_w, cell_h), interpolation=cv2.INTER_CUBIC).astype(np.float64) / 255
        region = canvas[r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w]
        region[:] = region * (1 - cell[..., None]) + rng.uniform(0, 255, size=3) * cell[..., None]
    canvas += rng.normal(0, 6, size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from PIL import Image

    from declip_fast.data import demo
    from declip_fast.data.write import WriteConfig, write_dataset

    root = tmp_path_factory.mktemp("loader_bench")
    rng = np.random.default_rng(0)
    images, labels = demo.load_fashion_mnist("test")
    picks = rng.choice(len(images), size=(N_SAMPLES, GRID[0] * GRID[1]), replace=False)
    captions = demo.captions(labels[picks[:, 5]], rng)
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(N_SAMPLES):
            Image.fromarray(_photo(images[picks[i]], rng)).save(root / f"{i}.jpg", quality=90)
            writer.writerow([f"{i}.jpg", captions[i]])
    for name, side in (("beton", 512), ("beton384", 384)):
        write_dataset(
            root / "pairs.csv", root / f"{name}.beton", WriteConfig(max_side=side, workers=WORKERS, progress=False)
        )
    sizes = [os.path.getsize(root / f"{i}.jpg") for i in range(N_SAMPLES)]
    return {
        "csv": str(root / "pairs.csv"),
        "beton": str(root / "beton.beton"),
        "beton384": str(root / "beton384.beton"),
        "jpeg_kb": np.mean(sizes) / 1e3,
    }


def test_loader_throughput(benchmark, report, dataset):
    torch.set_num_threads(WORKERS)
    loaders = {}
    for name, (backend, beton, fused) in LOADERS.items():
        cfg = DataConfig(
            beton=dataset[beton] if beton else None,
            source=dataset["csv"],
            backend=backend,
            batch_size=BATCH,
            image_size=224,
            num_workers=WORKERS,
            ffcv_fused_views=fused,
        )
        loaders[name] = build_loader(cfg, "cpu")
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    counts = set()

    def epoch(name: str, setting: str):
        loader = loaders[name]
        loader.config.augment = SETTINGS[setting]  # read per batch by the loader's BatchViews
        start, start_cpu, n = time.perf_counter(), cpu_seconds(), 0
        for batch in loader:
            n += len(batch["index"])
        wall[name, setting].append(time.perf_counter() - start)
        cpu[name, setting].append(cpu_seconds() - start_cpu)
        counts.add(n)

    def one_round():
        for setting in SETTINGS:
            for name in LOADERS:
                if setting == "full" or name != "ffcv 2-pipe":  # its point is made once; time
                    epoch(name, setting)

    one_round()  # warm-up
    wall.clear()
    cpu.clear()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    assert counts == {N_SAMPLES - N_SAMPLES % BATCH}
    n = counts.pop()
    title = (
        f"Loader: two views at 224 px + MLM + EDA, {N_SAMPLES} JPEGs of {WIDTH}x{HEIGHT} "
        f"(~{dataset['jpeg_kb']:.0f} kB), {WORKERS} workers, batch {BATCH}, CPU, "
        f"best of {ROUNDS} epochs"
    )
    for setting in SETTINGS:
        fallback = n / min(wall["fallback", setting])
        for name in LOADERS:
            if not wall[name, setting]:
                continue
            rate = n / min(wall[name, setting])
            ms = 1e3 * statistics.median(cpu[name, setting]) / n
            benchmark.extra_info[f"{name}_{setting}_samples_per_s"] = rate
            benchmark.extra_info[f"{name}_{setting}_cpu_ms_per_sample"] = ms
            report(
                title,
                setting=setting,
                loader=name,
                samples_per_s=f"{rate:.1f}",
                per_core=f"{rate / WORKERS:.1f}",
                cpu_ms_per_sample=f"{ms:.2f}",
                vs_fallback=f"{rate / fallback:.2f}x",
            )
