"""Zero-shot evaluation against independent references: float64 prompt ensembles, numpy top-k,
oracle models that must score 1.0 (and 0.0 when their mapping is shifted), torchvision's
resize + centre crop, and the demo's own source images."""

import importlib.util
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from declip_fast.data.tokenizer import tokenize
from declip_fast.eval.zeroshot import (
    CLIP_IMAGENET_TEMPLATES,
    classifier_weights,
    evaluate,
    labelled_images,
    read_classes,
    zeroshot_demo,
    zeroshot_eval,
)

VOCAB = 49409  # CLIP's ids plus <mask>
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


class BagOfWords(nn.Module):
    """encode_text = sum of token embeddings (norm grows with length, so per-prompt normalization
    matters); encode_image = a function of the images given by the test."""

    def __init__(self, dim: int, seed: int, image_fn=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(VOCAB, dim, generator=g))
        self.image_fn = image_fn

    def encode_text(self, tokens, normalize=False):
        assert not self.training, "encoders must run in eval mode"
        out = (self.table[tokens] * (tokens != 0)[..., None]).sum(1)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize=False):
        assert not self.training, "encoders must run in eval mode"
        out = self.image_fn(images)
        return F.normalize(out, dim=-1) if normalize else out


def reference_weights(table: np.ndarray, prompts_per_class) -> np.ndarray:
    """CLIP's prompt ensemble in float64 numpy, one prompt at a time: [E, C]."""
    columns = []
    for prompts in prompts_per_class:
        features = []
        for prompt in prompts:
            ids = tokenize([prompt])[0].numpy()
            f = table[ids[ids != 0]].sum(0)
            features.append(f / np.linalg.norm(f))
        mean = np.mean(features, axis=0)
        columns.append(mean / np.linalg.norm(mean))
    return np.stack(columns, axis=1)


def test_templates_are_clips_80():
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None:
        pytest.skip("open_clip not installed")
    metadata = runpy.run_path(str(Path(spec.origin).with_name("zero_shot_metadata.py")))
    assert list(CLIP_IMAGENET_TEMPLATES) == [t("{}") for t in metadata["OPENAI_IMAGENET_TEMPLATES"]]


def test_classifier_weights_equal_float64_prompt_ensemble():
    model = BagOfWords(dim=24, seed=1).train()
    table = model.table.detach().double().numpy()
    classes = ["cat", "ankle boot", "t-shirt", "x"]
    templates = CLIP_IMAGENET_TEMPLATES[:7]
    weights = classifier_weights(model, classes, templates, "cpu", batch_size=5)  # 28 prompts, 5 a batch
    expected = reference_weights(table, [[t.format(c) for t in templates] for c in classes])
    assert weights.shape == (24, 4) and weights.dtype == torch.float32
    # float32 sums of <= 20 unit-scale embeddings: ~1e-6 error after normalization
    np.testing.assert_allclose(weights.numpy(), expected, atol=2e-6, rtol=0)
    assert model.training  # mode restored

    # explicit prompts per class, of different counts (one class has a single prompt)
    prompts = {"cat": ["a cat.", "a photo of my cat", "cats!"], "dog": ["dog"]}
    weights = classifier_weights(model, ["dog", "cat"], prompts, "cpu", batch_size=2)
    expected = reference_weights(table, [prompts["dog"], prompts["cat"]])
    np.testing.assert_allclose(weights.numpy(), expected, atol=2e-6, rtol=0)


def test_classifier_weights_of_a_real_model_match_per_prompt_float64():
    from declip_fast.models.presets import build

    torch.manual_seed(0)
    model = build("declip_tiny")
    classes, templates = ["coat", "bag", "sandal"], ("a photo of a {}.", "the {}", "art of a {}, small.")
    weights = classifier_weights(model, classes, templates, "cpu", batch_size=4)
    ref = model.double().eval()
    with torch.no_grad():
        columns = []
        for c in classes:
            f = torch.cat([ref.encode_text(tokenize([t.format(c)]), normalize=True) for t in templates])
            columns.append(F.normalize(f.mean(0), dim=0))
    # float32 through two transformer layers of width 64: ~1e-6; 1e-5 leaves 10x room
    np.testing.assert_allclose(weights.numpy(), torch.stack(columns, 1).numpy(), atol=1e-5, rtol=0)


def test_classifier_weights_reject_missing_prompts():
    model = BagOfWords(dim=4, seed=0)
    with pytest.raises(ValueError, match="no prompts for class"):
        classifier_weights(model, ["cat", "dog"], {"cat": ["a cat"]}, "cpu")
    with pytest.raises(ValueError, match="format strings"):
        classifier_weights(model, ["cat"], "a photo of a {}", "cpu")


@pytest.mark.parametrize("num_classes, dim", [(3, 8), (10, 16), (37, 5)])
def test_evaluate_equals_numpy_topk(num_classes, dim):
    g = torch.Generator().manual_seed(num_classes)
    n = 203  # batches of 50: the last one short
    features = torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    weights = F.normalize(torch.randn(dim, num_classes, generator=g), dim=0)
    model = BagOfWords(dim=dim, seed=0, image_fn=lambda x: x)
    batches = [(features[i : i + 50], labels[i : i + 50]) for i in range(0, n, 50)]
    result = evaluate(model, batches, weights, "cpu")

    x = features.double().numpy()
    scores = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ weights.double().numpy()
    order = np.argsort(-scores, axis=1)  # continuous random scores: no ties
    k = min(5, num_classes)
    y = labels.numpy()
    assert result["n"] == n
    assert result["top1"] == pytest.approx(np.mean(order[:, 0] == y), abs=1e-12)
    assert result["top5"] == pytest.approx(np.mean((order[:, :k] == y[:, None]).any(1)), abs=1e-12)
    if num_classes <= 5:
        assert result["top5"] == 1.0


def test_evaluate_rejects_out_of_range_labels_and_empty_input():
    model = BagOfWords(dim=4, seed=0, image_fn=lambda x: x)
    weights = F.normalize(torch.randn(4, 3), dim=0)
    with pytest.raises(ValueError, match="labels outside 0..2"):
        evaluate(model, [(torch.randn(2, 4), torch.tensor([0, 3]))], weights, "cpu")
    with pytest.raises(ValueError, match="no images"):
        evaluate(model, [], weights, "cpu")


# -- image folders ---------------------------------------------------------------------------------

COLOURS = {"b_red": (220, 30, 30), "a_green": (30, 200, 40), "c_blue": (20, 40, 230), "d_white": (240, 240, 240)}


def make_folder(root: Path, sizes=((60, 30), (30, 45), (48, 48))) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = np.clip(np.array(colour) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "a_green" / "notes.txt").write_text("not an image")
    return root


def test_folder_reader_matches_torchvision_resize_and_centre_crop(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    root = make_folder(tmp_path / "images")
    images = labelled_images(root, image_size=16, batch_size=5, num_workers=0)
    assert images.classes == sorted(COLOURS) and images.num_samples == 12 and len(images) == 3
    batches = list(images)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [c for c in range(4) for _ in range(3)]  # sorted class folders, files in order

    # sizes chosen so torchvision's rounding equals ours: 60x30 -> 32x16, 30x45 -> 16x24, 48 -> 16
    reference = transforms.Compose(
        [transforms.Resize(16, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(16)]
    )
    for i, name in enumerate(sorted(COLOURS)):
        for j in range(3):
            expected = np.asarray(reference(Image.open(root / name / f"{j}.png").convert("RGB")))
            expected = (expected / 255.0 - MEAN) / STD
            np.testing.assert_allclose(x[3 * i + j].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_oracle_model_scores_one_and_shifted_oracle_zero(tmp_path):
    """Image encoder: recovers the class from the image colour and returns that class's weight
    (plus noise); any mix-up of labels, class order, weights or scoring breaks the 1.0."""
    root = make_folder(tmp_path / "images")
    images = labelled_images(root, image_size=16, batch_size=5, num_workers=0)
    palette = torch.tensor([COLOURS[c] for c in images.classes], dtype=torch.float32) / 255
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    text_model = BagOfWords(dim=32, seed=3)
    weights = classifier_weights(text_model, images.classes, CLIP_IMAGENET_TEMPLATES, "cpu")
    g = torch.Generator().manual_seed(0)

    def oracle(shift):
        def image_fn(x):
            rgb = x.mean((2, 3)) * std + mean  # undo the normalization
            cls = torch.cdist(rgb, palette).argmin(1)
            return weights.T[(cls + shift) % len(palette)] + 0.05 * torch.randn(len(x), 32, generator=g)

        return BagOfWords(dim=32, seed=3, image_fn=image_fn)

    result = evaluate(oracle(0), images, weights, "cpu")
    assert result == {"top1": 1.0, "balanced_top1": 1.0, "top5": 1.0, "n": 12}
    assert evaluate(oracle(1), images, weights, "cpu")["top1"] == 0.0
    # the one-call path: folder names and CLIP's templates give the same classifier
    assert zeroshot_eval(oracle(0), root, None, "cpu", 16, batch_size=5, num_workers=0)["top1"] == 1.0


def test_reader_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no images"):
        labelled_images(tmp_path / "empty", 16)
    with pytest.raises(ValueError, match="expected a .beton file or an image folder"):
        labelled_images(tmp_path / "pairs.csv", 16)
    with pytest.raises(FileNotFoundError, match="missing.beton not found"):
        labelled_images(tmp_path / "missing.beton", 16)
    root = make_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="labels come from its subfolders"):
        labelled_images(root, 16, labels=np.zeros(12, np.int64))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cls").mkdir()
    (tmp_path / "broken" / "cls" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        list(labelled_images(tmp_path / "broken", 16, num_workers=0))


def test_read_classes_forms(tmp_path):
    (tmp_path / "a.json").write_text('{"classes": ["x", "y"], "prompts": {"x": ["an x"], "y": ["a y"]}}')
    (tmp_path / "b.json").write_text('{"classes": ["x"], "templates": ["a {}."]}')
    (tmp_path / "c.json").write_text('["x", "y"]')
    (tmp_path / "d.json").write_text("{not json")
    assert read_classes(tmp_path / "a.json") == (["x", "y"], {"x": ["an x"], "y": ["a y"]})
    assert read_classes(tmp_path / "b.json") == (["x"], ["a {}."])
    assert read_classes(tmp_path / "c.json") == (["x", "y"], None)
    with pytest.raises(ValueError, match="d.json"):
        read_classes(tmp_path / "d.json")


# -- the demo .beton (FFCV) ------------------------------------------------------------------------


def _originals(size: int):
    """The demo test subset's source images, upscaled as the writer does and centre-cropped = all."""
    from PIL import Image

    from declip_fast.data import demo
    from tests.eval.conftest import DEMO_TEST

    images, labels, _ = demo.subset("test", DEMO_TEST)
    up = [np.asarray(Image.fromarray(im).convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return np.stack(up).astype(np.float64) / 255, labels


@pytest.mark.slow
def test_beton_reader_returns_every_image_in_label_order_normalized(demo_data):
    from tests.eval.conftest import DEMO_TEST

    images = labelled_images(demo_data.test, image_size=32, batch_size=48, num_workers=1)
    assert images.classes is None and images.num_samples == DEMO_TEST and len(images) == 5
    batches = list(images)
    x = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).double().numpy() * STD + MEAN
    y = torch.cat([b[1] for b in batches]).numpy()
    reference, labels = _originals(32)
    assert x.shape == (DEMO_TEST, 32, 32, 3) and y.dtype == np.int64
    np.testing.assert_array_equal(y, np.load(demo_data.test_labels))
    np.testing.assert_array_equal(y, labels)
    # the right statistics per channel turn the gray images back into equal channels in [0, 1]
    assert x.min() > -0.005 and x.max() < 1.005
    assert np.abs(x - x.mean(-1, keepdims=True)).max() < 0.01  # swapped statistics give ~0.09
    # every image is closest to its own source image (64 px JPEG -> 32 px vs bicubic 28 -> 32)
    distance = ((x.mean(-1)[:, None] - reference.mean(-1)[None]) ** 2).mean((2, 3))
    np.testing.assert_array_equal(distance.argmin(1), np.arange(DEMO_TEST))
    assert np.sqrt(np.diag(distance)).max() < 0.06


@pytest.mark.slow
def test_beton_reader_errors_name_the_path(demo_data, tmp_path):
    beton = tmp_path / "copy.beton"
    beton.write_bytes(Path(demo_data.test).read_bytes())
    with pytest.raises(FileNotFoundError, match="copy_labels.npy not found for .*copy.beton"):
        labelled_images(beton, 32)
    np.save(tmp_path / "copy_labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match=f"{beton} holds 200 images but its labels have 7 rows"):
        labelled_images(beton, 32)
    np.save(tmp_path / "float.npy", np.zeros(200))
    with pytest.raises(ValueError, match="float.npy: expected a 1-D integer array"):
        labelled_images(beton, 32, labels=tmp_path / "float.npy")


@pytest.mark.slow
def test_zeroshot_demo_oracle_scores_one_and_random_model_is_near_chance(demo_data):
    from declip_fast.models.presets import build

    torch.manual_seed(0)
    model = build("declip_tiny")
    random_result = zeroshot_demo(model, demo_data.classes.parent, "cpu", image_size=32)
    assert random_result["n"] == 200 and random_result["top1"] < 0.35  # chance: 0.1
    assert random_result["top5"] >= random_result["top1"]

    # oracle: look each image up among the source images, return its class's prompt ensemble
    classes, prompts = read_classes(demo_data.classes)
    text_model = BagOfWords(dim=32, seed=5)
    weights = classifier_weights(text_model, classes, prompts, "cpu")
    reference, labels = _originals(32)
    reference = torch.from_numpy(reference.mean(-1)).float().flatten(1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def lookup(x):
        gray = (x * std + mean).mean(1).flatten(1)
        return weights.T[torch.from_numpy(labels)[torch.cdist(gray, reference).argmin(1)]]

    text_model.image_fn = lookup
    assert zeroshot_demo(text_model, demo_data.classes.parent, "cpu", image_size=32)["top1"] == 1.0
