"""``declip-fast eval``: model loading and the subcommand end to end (folder and demo data)."""

import argparse
import json
import sys
import types

import numpy as np
import pytest
import torch

from declip_fast.eval.cli import add_parser, load_model
from declip_fast.models.presets import build
from tests.eval.test_zeroshot import COLOURS, make_folder


def parse(argv):
    parser = argparse.ArgumentParser(prog="declip-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser, parser.parse_args(["eval", *argv])


def main(argv) -> int:
    parser, args = parse(argv)
    return args.func(args, parser)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    model = build("declip_tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _same_parameters(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_from_state_dict_files(weights_file, tmp_path):
    path, model = weights_file
    assert _same_parameters(load_model(path, "declip_tiny"), model)
    wrapped = tmp_path / "wrapped.pt"  # a trainer-style dict with DDP / compile prefixes
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 3}, wrapped)
    assert _same_parameters(load_model(wrapped, "declip_tiny"), model)
    with pytest.raises(ValueError, match="--preset"):
        load_model(path, None)
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        load_model(path, "declip_tiny_rn")
    with pytest.raises(FileNotFoundError, match="nothing.pt not found"):
        load_model(tmp_path / "nothing.pt", "declip_tiny")


def test_load_model_from_a_run_folder_goes_through_the_trainer(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="is not a run folder"):
        load_model(run, None)
    (run / "config.yaml").write_text("model:\n  preset: clip_tiny\n")
    # records what the checkpoint reader (shared with the trainer) gets
    stub = types.ModuleType("declip_fast.distributed.checkpoint_format")
    monkeypatch.setitem(sys.modules, "declip_fast.distributed.checkpoint_format", stub)
    seen = []
    stub.load_model_for_eval = lambda path, model: seen.append((path, model)) or path
    model = load_model(run, None)
    assert seen == [(run, model)] and model.config.simsiam is None  # built from config.yaml
    assert load_model(run, "declip_tiny").config.simsiam is not None  # --preset wins


@pytest.mark.slow  # torch.distributed.checkpoint: ~6 s here
def test_load_model_from_a_real_checkpoint(weights_file, tmp_path):
    from declip_fast.train import checkpoint
    from declip_fast.train.config import ModelConfig, TrainConfig, save_config

    _, model = weights_file
    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(run_dir=str(run), model=ModelConfig(preset="declip_tiny")), run / "config.yaml")
    saved = checkpoint.Checkpointer(run).save(7, model, torch.optim.SGD(model.parameters(), lr=0.1))
    for where in (run, saved):  # the run folder (newest checkpoint) or the checkpoint folder itself
        assert _same_parameters(load_model(where), model)


def test_eval_on_an_image_folder_prints_the_table(weights_file, tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    classes = tmp_path / "classes.json"
    classes.write_text(
        json.dumps(
            {"classes": [c.split("_")[1] for c in sorted(COLOURS)], "templates": ["a {} image.", "the colour {}."]}
        )
    )
    path, _ = weights_file
    code = main(
        [
            str(path),
            "--preset",
            "declip_tiny",
            "--data",
            str(root),
            "--classes",
            str(classes),
            "--workers",
            "0",
            "--batch-size",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = dict(line.rsplit(None, 1) for line in out.splitlines()[1:])
    assert rows["zero-shot n"] == "12"
    assert 0 <= float(rows["zero-shot top1"]) <= float(rows["zero-shot top5"]) == 1.0  # 4 classes: top-4


def test_eval_argument_errors(weights_file, tmp_path, capsys):
    path, _ = weights_file
    with pytest.raises(SystemExit):
        main([str(path), "--preset", "declip_tiny"])  # neither --data nor --demo
    assert "give either --data PATH or --demo DIR" in capsys.readouterr().err
    root = make_folder(tmp_path / "images")

    def one_line():  # each error: exit 2 and a single line on stderr
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    assert main([str(path), "--data", str(root)]) == 2
    assert "--preset" in one_line()
    assert main([str(path), "--preset", "declip_tiny", "--data", str(root), "--linear-probe"]) == 2
    assert "--linear-probe needs --train-data" in one_line()
    assert main([str(path), "--preset", "declip_tiny", "--demo", str(tmp_path / "nodemo")]) == 2
    assert "write-dataset --demo" in one_line()
    bad = tmp_path / "bad.json"
    bad.write_text('{"classes": ["only", "three", "names"]}')
    assert main([str(path), "--preset", "declip_tiny", "--data", str(root), "--classes", str(bad)]) == 2
    assert "names 3 classes" in one_line()
    assert main([str(tmp_path / "missing"), "--preset", "declip_tiny", "--data", str(root)]) == 2
    assert "missing" in one_line()


@pytest.mark.slow
def test_eval_demo_with_linear_probe(weights_file, demo_data, capsys):
    from declip_fast.eval.zeroshot import zeroshot_demo

    path, model = weights_file
    code = main(
        [
            str(path),
            "--preset",
            "declip_tiny",
            "--demo",
            str(demo_data.classes.parent),
            "--linear-probe",
            "--workers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = dict(line.rsplit(None, 1) for line in out.splitlines()[1:])
    expected = zeroshot_demo(model, demo_data.classes.parent, "cpu", 32, num_workers=1)
    assert float(rows["zero-shot top1"]) == pytest.approx(expected["top1"], abs=1e-4)
    assert rows["zero-shot n"] == "200" and rows["linear-probe n_train"] == "64"
    assert 0 <= float(rows["linear-probe top1"]) <= 1
    assert float(rows["linear-probe best_C"]) in [pytest.approx(c) for c in np.logspace(-3, 3, 7)]
    # --data with the .beton beside classes.json reads the same labels and prompts
    assert main([str(path), "--preset", "declip_tiny", "--data", str(demo_data.test), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == out.splitlines()[1].split()


def test_eval_retrieval_prints_recall_rows(weights_file, tmp_path, capsys):
    """--retrieval alone: recall rows that equal the float64 definitions on the tiny model's own
    float64 embeddings; with --data too, both tables; a bad pair source is one error line."""
    import copy

    from declip_fast.data.tokenizer import tokenize
    from declip_fast.eval.images import _ImageFiles
    from declip_fast.eval.retrieval import read_pairs
    from tests.eval.test_retrieval import make_pairs, min_score_gap, reference_recall

    pairs_dir = make_pairs(tmp_path / "pairs")
    path, model = weights_file
    argv = [str(path), "--preset", "declip_tiny", "--retrieval", str(pairs_dir), "--workers", "0", "--batch-size", "3"]
    assert main(argv) == 0
    rows = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert rows["retrieval n_images"] == "4" and rows["retrieval n_texts"] == "7"
    pairs = read_pairs(pairs_dir)
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        images = torch.stack([_ImageFiles(pairs.images, 32)[i] for i in range(4)]).double()
        x = ref.encode_image(images, normalize=True)
        y = ref.encode_text(tokenize(pairs.captions, context_length=ref.config.text.context_length), normalize=True)
    assert min_score_gap(x, y, pairs.text_to_image) > 1e-4  # float32 and float64 rank alike
    expected = reference_recall(x, y, pairs.text_to_image)
    assert {k.removeprefix("retrieval "): v for k, v in rows.items()} == {
        k: f"{v:.4f}" if "R@" in k else str(v) for k, v in expected.items()
    }
    root = make_folder(tmp_path / "images")
    assert main([*argv, "--data", str(root)]) == 0
    rows = dict(line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert {"zero-shot top1", "zero-shot balanced_top1", "retrieval t2i_R@10"} <= rows.keys()
    (pairs_dir / "blue.txt").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "blue: missing caption" in err, err
