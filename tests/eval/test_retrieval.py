"""Retrieval recall@K against independent references: the definitions computed literally in
float64 (whole similarity matrix, argsort), chance level of random embeddings, perfect
embeddings, hand-worked ties; the held-out pair readers; an oracle model end to end. Also
zero-shot's balanced top-1 against a direct per-class computation."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from declip_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from declip_fast.data.tokenizer import tokenize
from declip_fast.eval.retrieval import KS, read_pairs, recall_at_k, retrieval_eval
from declip_fast.eval.zeroshot import evaluate
from tests.eval.test_zeroshot import BagOfWords


def reference_recall(images, texts, owner, ks=KS) -> dict:
    """The definitions read literally, in float64: rank every caption for every image (and every
    image for every caption) with np.argsort, then look for the own ones among the first K."""
    x, y, g = images.double().numpy(), texts.double().numpy(), owner.numpy()
    scores = x @ y.T
    i2t = np.argsort(-scores, axis=1, kind="stable")
    t2i = np.argsort(-scores.T, axis=1, kind="stable")
    out = {
        f"i2t_R@{k}": np.mean([np.isin(i2t[i, :k], np.flatnonzero(g == i)).any() for i in range(len(x))]) for k in ks
    }
    out.update({f"t2i_R@{k}": np.mean([g[t] in t2i[t, :k] for t in range(len(y))]) for k in ks})
    out.update(n_images=len(x), n_texts=len(y))
    return out


def min_score_gap(images, texts, owner) -> float:
    """Smallest gap between a score a rank hinges on (an image's best own caption, a caption's own
    image) and another candidate's score in its row: float32 ranks as float64 does while this
    exceeds twice float32's rounding of a score."""
    scores = images.double() @ texts.double().T
    own = owner[None, :] == torch.arange(len(images))[:, None]
    best = scores.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
    i2t = (scores - best).abs()[~own]  # other images' captions against an image's best own one
    t2i = (scores - scores.gather(0, owner[None, :])).abs()[~own]  # other images against a caption's own
    gaps = torch.cat([i2t, t2i])
    return float(gaps.min()) if len(gaps) else float("inf")


def random_case(n_img, n_txt, dim, seed):
    """Captions near their image (varied strength, so recalls are neither 0 nor 1); every image
    has a caption, some several."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    owner = owner[torch.randperm(n_txt, generator=g)]
    images = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    signal = torch.rand(n_txt, 1, generator=g) * 2
    texts = F.normalize(signal * images[owner] + torch.randn(n_txt, dim, generator=g), dim=1)
    return images, texts, owner


@pytest.mark.parametrize(
    "n_img, n_txt, dim, chunk, dtype",
    [
        (10, 10, 8, 3, torch.float32),
        (10, 23, 8, 3, torch.float32),  # several captions per image, chunks smaller than N
        (37, 100, 16, 7, torch.float32),
        (50, 130, 4, 1024, torch.float32),  # one chunk
        (1, 3, 4, 1, torch.float32),  # a single image: every caption finds it
        (40, 90, 8, 16, torch.bfloat16),  # upcast to float32
    ],
)
def test_recall_equals_float64_argsort(n_img, n_txt, dim, chunk, dtype):
    images, texts, owner = random_case(n_img, n_txt, dim, seed=n_txt)
    images, texts = images.to(dtype), texts.to(dtype)
    # a float32 dot product of unit vectors (dim <= 16) errs by < dim * 2**-24 = 1e-6: with gaps of
    # twice that, float32 ranks as float64 does, and ties (where the tie rule would matter) are absent
    assert min_score_gap(images, texts, owner) > 2e-6
    ks = (1, 2, 5, 10, 20)
    result = recall_at_k(images, texts, owner, ks=ks, chunk_size=chunk)
    expected = reference_recall(images, texts, owner, ks)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < result["t2i_R@1"] < 1 or n_img == 1  # a case where rank errors would show


def test_random_embeddings_score_chance():
    """Independent random embeddings, 1000 images of one caption each: the own image's rank (and
    the own caption's) is uniform on 0..N-1, so each of the N indicators of a hit at K is
    Bernoulli(K/N), and their count is ~binomial(N, K/N) (the indicators share one gallery, but
    their correlations are O(1/N)). The test allows 5 standard deviations either way: a fixed
    seed, but a bound no correct implementation would reach by chance."""
    g = torch.Generator().manual_seed(0)
    n = 1000
    images = F.normalize(torch.randn(n, 64, generator=g), dim=1)
    texts = F.normalize(torch.randn(n, 64, generator=g), dim=1)
    ks = (1, 5, 10, 100)  # K = 100: 100 +- 47 hits, a lower bound that bites
    result = recall_at_k(images, texts, torch.arange(n), ks=ks, chunk_size=256)
    for k in ks:
        p = k / n
        bound = 5 * np.sqrt(n * p * (1 - p)) / n
        for direction in ("i2t", "t2i"):
            assert abs(result[f"{direction}_R@{k}"] - p) <= bound, (direction, k, result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perfect_embeddings_score_one(dtype):
    g = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(30, 16, generator=g), dim=1).to(dtype)
    owner = torch.tensor([i for i in range(30) for _ in range(1 + i % 3)])  # 1 to 3 captions each
    result = recall_at_k(images, images[owner], owner, chunk_size=3)
    assert result == {**{f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in KS}, "n_images": 30, "n_texts": 60}


def test_ties_count_against_the_model():
    # Collapsed embeddings: every score ties. Image ranks = other images' captions [2, 3, 3];
    # caption ranks = other images [2, 2, 2, 2]. (Counting strictly higher scores would give 1s.)
    same = torch.ones(3, 2) / 2
    result = recall_at_k(same, torch.ones(4, 2) / 2, torch.tensor([0, 0, 1, 2]), ks=(1, 2, 3, 4), chunk_size=2)
    assert [result[f"i2t_R@{k}"] for k in (1, 2, 3, 4)] == [0, 0, 1 / 3, 1]
    assert [result[f"t2i_R@{k}"] for k in (1, 2, 3, 4)] == [0, 0, 1, 1]
    # One tie: caption 1 scores 0.5 against its image 1 and against image 0 -> rank 1 (exact values)
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1]])
    result = recall_at_k(images, texts, torch.tensor([0, 1, 2]), ks=(1, 2))
    assert result["t2i_R@1"] == 2 / 3 and result["t2i_R@2"] == 1.0
    assert result["i2t_R@1"] == 1.0  # image 1's caption scores 0.5; the other captions 0


def test_recall_rejects_bad_input():
    x = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ValueError, match=r"\[N_img, E\] and \[N_txt, E\]"):
        recall_at_k(x, torch.randn(4, 5), torch.arange(4))
    with pytest.raises(ValueError, match="text_to_image must be integer"):
        recall_at_k(x, x, torch.arange(3))
    with pytest.raises(ValueError, match="outside 0..3"):
        recall_at_k(x, x, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="1 image.s. without a caption"):
        recall_at_k(x, x, torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(x, x.clone().fill_(float("nan")), torch.arange(4))
    with pytest.raises(ValueError, match="positive integer ks"):
        recall_at_k(x, x, torch.arange(4), ks=(0, 1))


# -- held-out pairs ----------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "white": (240, 240, 240)}
CAPTIONS = {"red": ["a red square", "red paint"], "green": ["green"], "blue": ["a blue thing", "blue", "deep blue"]}
CAPTIONS["white"] = ["white snow"]


def make_pairs(root: Path) -> Path:
    """A folder of colour images, each with a .txt of its captions (one per line, blank lines and
    CRLF mixed in); sizes vary, so resize + crop run."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (name, colour) in enumerate(COLOURS.items()):
        w, h = (60, 30) if i % 2 else (30, 45)
        pixels = np.clip(np.array(colour) + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
        (root / f"{name}.txt").write_bytes(("\r\n\n".join(CAPTIONS[name]) + "\n").encode())
    return root


def test_read_pairs_from_a_folder_and_a_table(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    pairs = read_pairs(root)
    names = sorted(COLOURS)  # the folder lister's order
    assert [Path(b.path).stem for b in pairs.images] == names
    assert pairs.captions == [c for name in names for c in CAPTIONS[name]]
    assert pairs.text_to_image.tolist() == [i for i, name in enumerate(names) for _ in CAPTIONS[name]]
    # a table: rows of one image file (however its path is spelled) are captions of one image
    table = root / "pairs.csv"
    (root / "sub").mkdir()
    table.write_text(
        'image,caption\nred.png,a red square\nblue.png,blue\nsub/../red.png,"red, again"\ngreen.png,green\n'
    )
    pairs = read_pairs(table)
    assert [Path(b.path).name for b in pairs.images] == ["red.png", "blue.png", "green.png"]
    assert pairs.captions == ["a red square", "blue", "red, again", "green"]
    assert pairs.text_to_image.tolist() == [0, 1, 0, 2]


def test_read_pairs_errors_name_the_problem(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    (root / "blue.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="blue: empty caption"):
        read_pairs(root)
    (root / "blue.txt").unlink()
    with pytest.raises(ValueError, match="blue: missing caption"):
        read_pairs(root)
    table = tmp_path / "pairs.csv"
    table.write_text('red.png,fine\nblue.png,"unterminated\n')
    with pytest.raises(ValueError, match="pairs.csv:2: malformed row"):
        read_pairs(table)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image-text pairs"):
        read_pairs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_pairs(tmp_path / "nothing.csv")


class ColourOracle(nn.Module):
    """Text: one-hot of the colour word in the caption. Image: one-hot of the nearest palette
    colour, shifted by ``shift`` classes, plus 0.5 everywhere, scaled by a factor that grows with
    the colour (so only normalized image embeddings rank right). shift 0 must score 1 everywhere,
    any other shift 0 at R@1."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift, self.unused = shift, nn.Parameter(torch.zeros(1))
        self.palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
        self.word_ids = torch.tensor([int(tokenize([c])[0, 1]) for c in COLOURS])

    def encode_text(self, tokens, normalize=False):
        assert not self.training, "encoders must run in eval mode"
        out = (tokens[:, :, None] == self.word_ids).any(1).float()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize=False):
        assert not self.training, "encoders must run in eval mode"
        rgb = images.mean((2, 3)) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
        cls = torch.cdist(rgb, self.palette).argmin(1)
        out = (F.one_hot((cls + self.shift) % len(COLOURS), len(COLOURS)) + 0.5) * (1 + 3 * cls[:, None])
        return F.normalize(out, dim=-1) if normalize else out


def test_oracle_model_scores_one_and_shifted_oracle_zero(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    result = retrieval_eval(ColourOracle(0).train(), root, "cpu", 16, batch_size=3, num_workers=0)
    assert result == {**{f"{d}_R@{k}": 1.0 for d in ("i2t", "t2i") for k in KS}, "n_images": 4, "n_texts": 7}
    shifted = retrieval_eval(ColourOracle(1), root, "cpu", 16, batch_size=3, num_workers=0)
    assert shifted["i2t_R@1"] == shifted["t2i_R@1"] == 0.0 and shifted["t2i_R@5"] == 1.0


# -- zero-shot balanced top-1 ---------------------------------------------------------------------


def test_balanced_top1_equals_mean_per_class_recall():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 6, 8
    labels = torch.tensor([0] * 90 + [1] * 7 + [2] * 30 + [3] * 2 + [5] * 21)  # class 4 absent
    labels = labels[torch.randperm(len(labels), generator=g)]
    weights = F.normalize(torch.randn(dim, num_classes, generator=g), dim=0)
    features = weights.T[labels] + 0.9 * torch.randn(len(labels), dim, generator=g)
    batches = [(features[i : i + 40], labels[i : i + 40]) for i in range(0, len(labels), 40)]
    result = evaluate(BagOfWords(dim, seed=0, image_fn=lambda x: x), batches, weights, "cpu")

    predicted = np.argmax(features.double().numpy() @ weights.double().numpy(), axis=1)
    y = labels.numpy()
    recalls = [np.mean(predicted[y == c] == c) for c in range(num_classes) if (y == c).any()]
    assert result["balanced_top1"] == pytest.approx(np.mean(recalls), abs=1e-12)
    assert result["top1"] == pytest.approx(np.mean(predicted == y), abs=1e-12)
    assert abs(result["balanced_top1"] - result["top1"]) > 0.01  # unbalanced: the two differ here
    metrics = pytest.importorskip("sklearn.metrics")
    with warnings.catch_warnings():  # sklearn warns of predictions of class 4, which has no images
        warnings.simplefilter("ignore")
        assert result["balanced_top1"] == pytest.approx(metrics.balanced_accuracy_score(y, predicted), abs=1e-12)
