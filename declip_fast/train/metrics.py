"""What a run reports: ``metrics.csv`` (one row per step), TensorBoard scalars and, at the end, a
PNG of the loss curves and zero-shot accuracy. Only rank 0 writes.

The CSV's columns are fixed when the run starts (:data:`COLUMNS` plus one per loss term), so
rows stay aligned when a term (NNS, while its queue fills) is absent: its cell is empty. On
resume, and when a diverging run rolls back to a checkpoint, the rows after the checkpoint's step
are dropped (those steps run again), so every step has one row. TensorBoard and
matplotlib are optional (``pip install 'declip-fast[train]'``): without them the run says so once
and goes on with the CSV.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

from declip_fast.atomic import atomic_write

log = logging.getLogger(__name__)
COLUMNS = (
    "step",
    "total",
    "lr",
    "logit_scale",
    "grad_norm",
    "images_per_s",
    "images_per_s_per_device",
    "mfu",
    "data_wait",
    "skipped_steps",
)


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        terms: list[str],
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int = 0,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.columns = ["step", *terms, *COLUMNS[1:]]
        self._writer = None
        self._run_dir, self._tensorboard = Path(run_dir), tensorboard
        if enabled:
            self._open(resume_step)

    def _open(self, resume_step: int) -> None:
        """(Re)write the CSV with the rows up to ``resume_step`` and open it for appending."""
        kept = _rows_up_to(self.path, resume_step, self.columns) if resume_step else []

        def rewrite(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, self.columns)
                w.writeheader()
                w.writerows(kept)

        atomic_write(self.path, rewrite)
        self._file = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as err:  # ImportError, or a broken tensorboard install
                log.warning("TensorBoard logging off (%s); pip install 'declip-fast[train]'", err)
                self._tensorboard = False
            else:
                self._writer = SummaryWriter(str(self._run_dir / "tensorboard"), purge_step=resume_step + 1)

    def truncate(self, step: int) -> None:
        """Drop the rows (and TensorBoard points) after ``step``: the run went back to it."""
        if not self.enabled:
            return
        self.close()
        self._writer = None
        self._open(step)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _cell(v) for k, v in values.items()}}
        self._csv.writerow(row)
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key if key in COLUMNS else f"loss/{key}", value, step)

    def log_eval(self, step: int, results: dict, prefix: str = "zeroshot") -> None:
        if self.enabled and self._writer is not None:
            for key, value in results.items():
                if isinstance(value, float):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._writer is not None:
                self._writer.close()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision: a resumed run's rows can be compared exactly
    return value


def _rows_up_to(path: Path, step: int, columns: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    return [{k: r.get(k, "") for k in columns} for r in rows]


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The CSV's rows with numbers parsed (empty cells: None)."""

    def num(text):
        if text in ("", None):
            return None
        try:
            return int(text)
        except ValueError:
            return float(text)

    with open(path, newline="") as f:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_run(run_dir: str | os.PathLike, terms: list[str], zeroshot: dict | None = None) -> Path | None:
    """``run_dir/curves.png``: each loss term and the total against the step (log scale where
    positive), the lr below, and the zero-shot accuracy in the title. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:
        log.warning("no loss-curve plot (%s); pip install 'declip-fast[train]'", err)
        return None
    rows = read_metrics(Path(run_dir) / "metrics.csv")
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for term in [*terms, "total"]:
        points = [(s, r[term]) for s, r in zip(steps, rows) if r.get(term) is not None]
        if points:
            top.plot(*zip(*points), label=term, linewidth=1.2 if term == "total" else 0.8)
    top.set_ylabel("loss (unweighted terms)")
    top.legend(loc="upper right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r["lr"] for r in rows], color="gray")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    title = f"{Path(run_dir).name}"
    if zeroshot:
        title += "  |  zero-shot " + ", ".join(f"{k} {v:.1%}" for k, v in zeroshot.items() if isinstance(v, float))
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_BF16`; None on a CPU or an unknown GPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def model_flops_per_sample(model, need: dict) -> float | None:
    """~6 x parameters x tokens per tower and view (forward + backward matmuls; attention's
    quadratic part and the heads ignored): the MFU estimate's work per image-text pair; ViTs only."""

    def params(module):
        return sum(p.numel() for p in module.parameters())

    cfg = model.config
    patch = getattr(cfg.vision, "patch_size", None)
    if not patch:  # a ResNet: parameters x tokens does not describe a conv net; no estimate
        return None
    vision_tokens = (cfg.vision.image_size // patch) ** 2 + 1
    vision = params(model.visual) * vision_tokens * need["image_views"]
    text = params(model.text) * cfg.text.context_length * need["text_views"]
    return 6.0 * (vision + text)
