"""declip_fast's ClipLoss inside OpenCLIP's own trainer (``python -m open_clip_train.main``) with
``--precision amp``: fp16 autocast and a GradScaler starting at 65536, on the CPU.

A loss returned in fp16 receives GradScaler's 65536 as its upstream gradient, which is inf in
fp16 (max 65504): the first step is skipped and the scale halved (and so again whenever it grows
back to 65536). With the contract (an fp32 loss under autocast, as OpenCLIP's own) every step
updates the weights.

Also ``declip_fast.integrations.open_clip_train``, the same trainer with every OpenCLIP loss we
have a drop-in for swapped in, against OpenCLIP's own run: CLIP, SigLIP, a tiny CoCa and a
distillation run, in fp32 and amp_bf16, on 1 and 2 gloo ranks (SigLIP in each exchange), every loss term of
every step (tests/losses/open_clip_harness.py runs the trainer).
"""

import itertools
import json
import math
import re
import subprocess
import sys
import textwrap

import pytest

from tests.losses.open_clip_harness import dataset, launch, local_model, trainer_argv

pytest.importorskip("open_clip_train.main", reason="open_clip_train needs open-clip-torch[training]")
pytest.importorskip("PIL.Image")

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


@pytest.mark.slow
def test_amp_fp16_training_with_our_loss_never_skips_a_step(pairs, tmp_path):
    csv, _ = pairs
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


# OpenCLIP's own run against the swapped one, every loss family in both precisions, in one process
# (tests/losses/open_clip_harness.py): every loss term of every step, as the loss returned it.
FAMILIES = {"clip": "ClipLoss", "siglip": "SigLipLoss", "coca": "CoCaLoss", "distill": "DistillClipLoss"}
PRECISIONS = ("fp32", "amp_bf16")
# Relative tolerances, (first step, later steps). fp32: the same features in, the same loss out up
# to fp32 rounding and summation order; 1e-5 is ~80 ulps over 3 steps (measured: 3.1e-7 at worst,
# distill; 1-1.3e-7 CLIP, SigLIP, CoCa; 2.8e-7 on 2 ranks). amp_bf16: both runs see the same bf16
# features at the first step, but OpenCLIP's loss forms the logits in bf16 under autocast (and
# returns SigLIP's and the distillation loss in bf16) where ours works in fp32: they differ by bf16
# rounding, u = 2**-8 relative, so 2u at the first step (measured 3.7e-3, SigLIP: exactly the bf16
# rounding of OpenCLIP's loss value; 3.9e-4 CLIP, 2.1e-4 CoCa, 3.1e-3 distill). The gradients then
# differ at that level too and so do the next steps' weights: 4u for the later steps (measured
# 5.4e-3 at worst, CLIP's second step; CoCa 4.3e-3, distill 5.2e-3, SigLIP 2.1e-3).
RTOL = {"fp32": (1e-5, 1e-5), "amp_bf16": (2**-7, 2**-6)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The 24 pairs' CSV and ``--model`` arguments per family, once per module."""
    root = tmp_path_factory.mktemp("open-clip-train")
    clip = ["--model", local_model(root, "tiny-clip", TINY)]
    teacher = ["--distill-model", local_model(root, "tiny-teacher", TINY_TEACHER)]
    models = {
        "clip": clip,
        "siglip": [*clip, "--siglip"],  # the trainer then inits logit_scale log(10) and logit_bias -10
        "coca": ["--model", local_model(root, "tiny-coca", TINY_COCA)],
        # --distill-pretrained is ignored for local-dir: models (a random teacher) but switches distillation on.
        "distill": [*clip, *teacher, "--distill-pretrained", "none"],
    }
    return dataset(root), models


@pytest.fixture(scope="module")
def one_rank(pairs, tmp_path_factory):
    """Each family in each precision, OpenCLIP's losses then ours: (record, stderr)."""
    csv, models = pairs
    folder = tmp_path_factory.mktemp("one-rank")
    runs = []
    for ours in (False, True):
        for family, precision in itertools.product(FAMILIES, PRECISIONS):
            name = f"{family}-{precision}-{'ours' if ours else 'theirs'}"
            argv = trainer_argv(csv, folder / "logs", name, *models[family], precision=precision)
            runs.append({"name": name, "ours": ours, "argv": argv})
    records, stderr = launch(folder, runs)
    return records[0], stderr


def _assert_same_losses(theirs, ours, cls, rtol, steps=3):
    """OpenCLIP's ``cls`` in ``theirs``, ours in ``ours``, and every term of every step within ``rtol``
    (first step, later steps) of OpenCLIP's."""
    assert theirs["cls"] == f"open_clip.loss.{cls}", theirs["cls"]
    assert ours["cls"].startswith("declip_fast.losses.") and ours["cls"].endswith(f".{cls}"), ours["cls"]
    assert len(theirs["steps"]) == len(ours["steps"]) == steps, (theirs["steps"], ours["steps"])
    assert all(d == ["torch.float32"] for d in ours["dtypes"]), ours["dtypes"]
    for step, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            assert math.isfinite(a[key]), (step, key, a)
            tol = rtol[step > 0] * abs(b[key])
            assert abs(a[key] - b[key]) <= tol, (step, key, a[key], b[key], rtol)


@pytest.mark.slow
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_run_matches_open_clips_own(one_rank, family, precision):
    """The trainer's run with our loss computes the same loss at every step as with OpenCLIP's."""
    record, stderr = one_rank
    assert "declip_fast.losses ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss" in stderr, stderr[-2000:]
    theirs, ours = record[f"{family}-{precision}-theirs"], record[f"{family}-{precision}-ours"]
    _assert_same_losses(theirs, ours, FAMILIES[family], RTOL[precision])


# The 2-rank cases: CLIP with --local-loss --gather-with-grad, SigLIP in each of OpenCLIP's
# --loss-dist-impl exchanges (bidir is its default), CoCa with the trainer's defaults, distillation
# with the local loss; every family in fp32 and in amp_bf16 (SigLIP's default exchange).
SIGLIP_IMPLS = ("bidir", "shift", "reduce", "gather")


def _two_rank_cases(models):
    cases = {}
    for precision in PRECISIONS:
        cases[f"clip-{precision}"] = ("clip", precision, [*models["clip"], "--local-loss", "--gather-with-grad"])
        for impl in SIGLIP_IMPLS if precision == "fp32" else SIGLIP_IMPLS[:1]:
            cases[f"siglip-{impl}-{precision}"] = ("siglip", precision, [*models["siglip"], "--loss-dist-impl", impl])
        cases[f"coca-{precision}"] = ("coca", precision, models["coca"])
        local = ["--local-loss", "--gather-with-grad"]  # without: every rank computes the same global loss
        cases[f"distill-{precision}"] = ("distill", precision, [*models["distill"], *local])
    return cases


@pytest.mark.slow
@pytest.mark.distributed
def test_swapped_run_matches_open_clips_own_on_two_gloo_ranks(pairs, tmp_path):
    """2 gloo ranks (OpenCLIP's own init: ``WORLD_SIZE``/``RANK`` in the environment, ``--dist-backend
    gloo``, a ``file://`` rendezvous; 12 pairs each, 3 steps of 4): every loss family in fp32 and
    amp_bf16, SigLIP in each distributed exchange, gives each rank the same losses with ours as
    with OpenCLIP's."""
    csv, models = pairs
    cases = _two_rank_cases(models)
    runs = []
    for ours in (False, True):
        for case, (_, precision, extra) in cases.items():
            name = f"{case}-{'ours' if ours else 'theirs'}"
            argv = trainer_argv(csv, tmp_path / "logs", name, *extra, batch=4, precision=precision)
            runs.append({"name": name, "ours": ours, "argv": argv})
    records, _ = launch(tmp_path, runs, world=2)
    for case, (family, precision, _) in cases.items():
        for record in records.values():
            theirs, ours = record[f"{case}-theirs"], record[f"{case}-ours"]
            assert theirs["world_size"] == ours["world_size"] == 2, (case, theirs, ours)
            _assert_same_losses(theirs, ours, FAMILIES[family], RTOL[precision])
        # Each rank its own half of the data: the ranks' losses differ.
        assert records[0][f"{case}-ours"]["steps"] != records[1][f"{case}-ours"]["steps"], case


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
