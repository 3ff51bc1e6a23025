"""declip_fast's ClipLoss inside OpenCLIP's own trainer (``python -m open_clip_train.main``) with
``--precision amp``: fp16 autocast and a GradScaler starting at 65536, on the CPU.

A loss returned in fp16 receives GradScaler's 65536 as its upstream gradient, which is inf in
fp16 (max 65504): the first step is skipped and the scale halved (and so again whenever it grows
back to 65536). With the contract (an fp32 loss under autocast, as OpenCLIP's own) every step
updates the weights.

Also ``python -m declip_fast.integrations.open_clip_train``, the same trainer with every OpenCLIP
loss we have a drop-in for swapped in (a tiny CoCa, a distillation run), against OpenCLIP's own run.
"""

import json
import math
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("open_clip_train.main", reason="open_clip_train needs open-clip-torch[training]")
Image = pytest.importorskip("PIL.Image")

# A tiny CLIP: 2-layer ViT on 32 px crops and a 2-layer text tower over 16 tokens, so that a
# handful of steps take seconds on two cores.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# Swaps our ClipLoss into the trainer's loss factory and records, per step, whether the
# optimizer ran and whether it changed the weights: GradScaler calls optimizer.step only for
# steps it does not skip.
LAUNCHER = """
    import json, sys
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    import open_clip
    import open_clip_train.main as train_main
    from declip_fast.losses import ClipLoss

    record_path, config, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    open_clip.add_model_config(config)
    record = {"losses": [], "loss_dtypes": [], "steps": []}

    class RecordedClipLoss(ClipLoss):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            loss = out["contrastive_loss"] if isinstance(out, dict) else out
            record["losses"].append(loss.item())
            record["loss_dtypes"].append(str(loss.dtype))
            return out

    def create_loss(args):
        return RecordedClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                rank=args.rank, world_size=args.world_size)

    def snapshot(optimizer):
        return [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    before = []
    def pre_hook(optimizer, args, kwargs):
        before[:] = snapshot(optimizer)
    def post_hook(optimizer, args, kwargs):
        after = snapshot(optimizer)
        record["steps"].append(sum(not torch.equal(a, b) for a, b in zip(before, after)))

    register_optimizer_step_pre_hook(pre_hook)
    register_optimizer_step_post_hook(post_hook)
    train_main.create_loss = create_loss
    try:
        train_main.main(argv)
    finally:
        with open(record_path, "w") as f:
            json.dump(record, f)
"""


def _dataset(root, n=24):
    """``n`` 40 px JPEGs (a colour and a stripe each) and a caption naming them, as a CSV."""
    rows = ["filepath,title"]
    colours = ["red", "green", "blue", "yellow"]
    values = [(220, 30, 30), (30, 200, 40), (40, 50, 230), (230, 220, 40)]
    for i in range(n):
        c = i % len(colours)
        image = Image.new("RGB", (40, 40), values[c])
        for x in range(0, 40, 2 + i % 5):
            image.paste((255, 255, 255), (x, 0, x + 1, 40))
        path = root / f"{i}.jpg"
        image.save(path, quality=90)
        rows.append(f"{path},a {colours[c]} square with {2 + i % 5} pixel stripes")
    csv = root / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.mark.slow
def test_amp_fp16_training_with_our_loss_never_skips_a_step(tmp_path):
    csv = _dataset(tmp_path)
    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY))
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    record_path = tmp_path / "record.json"
    batch, epochs = 8, 2
    argv = [
        "--model",
        "tiny-clip",
        "--train-data",
        str(csv),
        "--dataset-type",
        "csv",
        "--csv-separator",
        ",",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--batch-size",
        str(batch),
        "--epochs",
        str(epochs),
        "--workers",
        "0",
        "--precision",
        "amp",
        "--device",
        "cpu",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--log-every-n-steps",
        "1",
        "--logs",
        str(tmp_path / "logs"),
        "--name",
        "run",
        "--seed",
        "0",
    ]
    result = subprocess.run(
        [sys.executable, str(launcher), str(record_path), str(config), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = tmp_path / "logs" / "run" / "out.log"
    log_text = log.read_text() if log.exists() else ""
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(record_path.read_text())

    iterations = epochs * (24 // batch)
    assert len(record["losses"]) == iterations, record
    # Every iteration reached optimizer.step (GradScaler skipped none) and changed the weights.
    assert len(record["steps"]) == iterations, f"GradScaler skipped steps: {record}"
    assert all(changed > 0 for changed in record["steps"]), record["steps"]
    assert set(record["loss_dtypes"]) == {"torch.float32"}, record["loss_dtypes"]
    assert all(math.isfinite(x) for x in record["losses"]), record["losses"]
    # The trainer's own log line per step, "Contrastive_loss: <value> (<mean>)", is finite too.
    logged = [float(v) for v in re.findall(r"Contrastive_loss: (\S+)", log_text)]
    assert len(logged) == iterations and all(math.isfinite(v) for v in logged), log_text[-2000:]


# -- declip_fast.integrations.open_clip_train: OpenCLIP's trainer with all our losses swapped in.

# A tiny CoCa on the tiny CLIP's towers (the built-in coca_* configs are ViT-B and up): attentional
# pooling into 16 image tokens and a 2-layer multimodal decoder over the same 16 text tokens, all
# as wide as the embedding (as in coca_ViT-B-32).
TINY_COCA = {
    "embed_dim": 64,
    "vision_cfg": {
        **TINY["vision_cfg"],
        "attentional_pool": True,
        "attn_pooler_queries": 16,
        "attn_pooler_heads": 2,
        "output_tokens": True,
    },
    "text_cfg": {**TINY["text_cfg"], "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "custom_text": True,
}
# A distillation teacher of another width than the student.
TINY_TEACHER = {**TINY, "embed_dim": 24}


def _local_model(root, name, cfg):
    """A ``local-dir:`` model OpenCLIP builds from its config alone (random weights)."""
    folder = root / name
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def _train(root, module, csv, name, extra):
    """``python -m module`` (OpenCLIP's trainer or our integration) for 1 epoch of 3 fp32 steps:
    (stderr, the trainer's out.log)."""
    argv = ["--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", ","]
    argv += ["--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "8", "--epochs", "1"]
    argv += ["--workers", "0", "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--warmup", "1"]
    argv += ["--save-frequency", "0", "--zeroshot-frequency", "0", "--log-every-n-steps", "1"]
    argv += ["--logs", str(root / "logs"), "--name", name, "--seed", "0", *extra]
    result = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr, (root / "logs" / name / "out.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["coca", "distill"])
def test_integration_module_matches_open_clips_own_run(tmp_path, case):
    """The same run twice, OpenCLIP's loss then ours (CoCaLoss; DistillClipLoss with a teacher of
    another width): every per-step loss the trainer logs (5 significant digits) agrees."""
    csv = _dataset(tmp_path)
    if case == "coca":
        extra = ["--model", _local_model(tmp_path, "tiny-coca", TINY_COCA)]
        ours_name, keys = "CoCaLoss", ("Contrastive_loss", "Caption_loss")
    else:
        extra = ["--model", _local_model(tmp_path, "tiny-clip", TINY)]
        extra += ["--distill-model", _local_model(tmp_path, "tiny-teacher", TINY_TEACHER)]
        extra += ["--distill-pretrained", "none"]  # ignored for local-dir: models (random teacher)
        ours_name, keys = "DistillClipLoss", ("Contrastive_loss", "Distill_loss")
    _, theirs = _train(tmp_path, "open_clip_train.main", csv, "theirs", extra)
    banner, ours = _train(tmp_path, "declip_fast.integrations.open_clip_train", csv, "ours", extra)
    assert ours_name in banner, banner[-2000:]
    for key in keys:
        a = [float(v) for v in re.findall(rf"{key}: (\S+) \(", ours)]
        b = [float(v) for v in re.findall(rf"{key}: (\S+) \(", theirs)]
        assert len(a) == len(b) == 3, (key, a, b)
        assert all(math.isfinite(x) for x in a), a
        # The logs round to 5 significant digits: equal up to one unit in the last place.
        assert all(abs(x - y) <= 2e-4 * abs(y) for x, y in zip(a, b)), (key, a, b)


def test_integration_install_swaps_the_trainers_loss_classes():
    """``create_loss`` (what the trainer calls) builds ours once installed, OpenCLIP's again after."""
    import argparse

    import open_clip
    import open_clip.factory

    from declip_fast import losses
    from declip_fast.integrations import open_clip_train as integration

    base = dict(local_loss=False, gather_with_grad=False, rank=0, world_size=1, horovod=False, siglip=False)
    base.update(coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0, loss_dist_impl=None)
    cases = {
        "ClipLoss": argparse.Namespace(**base, distill=False, model="ViT-B-32"),
        "CoCaLoss": argparse.Namespace(**base, distill=False, model="coca_ViT-B-32"),
        "DistillClipLoss": argparse.Namespace(**base, distill=True, model="ViT-B-32"),
    }
    replaced = integration.install()
    try:
        for name, args in cases.items():
            assert type(open_clip.factory.create_loss(args)) is getattr(losses, name)
            assert open_clip.loss.__dict__[name] is getattr(losses, name)
        assert {"ClipLoss", "CoCaLoss", "DistillClipLoss"} <= {name for _, name, _ in replaced}
    finally:
        integration.uninstall(replaced)
    for args in cases.values():
        assert type(open_clip.factory.create_loss(args)).__module__ == "open_clip.loss"
