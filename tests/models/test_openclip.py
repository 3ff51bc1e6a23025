"""OpenCLIP parity at the real sizes (batch 2, fp32, eval): from_openclip gives OpenCLIP's
embeddings, and to_openclip_state_dict loads back into a fresh OpenCLIP model unchanged."""

import pytest
import torch
from torch import nn

from declip_fast.models import (
    MASK_ID,
    SimSiamConfig,
    build,
    from_openclip,
    openclip_to_declip_state_dict,
    to_openclip_state_dict,
)

open_clip = pytest.importorskip("open_clip")

TOL = 1e-5  # fp32, eval: measured max errors are 0.6e-6 to 2.6e-6 on features of magnitude ~1-4


@pytest.fixture(scope="module", params=["RN50", "ViT-B-32"])
def openclip_model(request):
    """A randomly initialised OpenCLIP model whose every weight and statistic is perturbed:
    zero-initialised pieces (biases, the ResNet's last BN scales) and unit statistics would
    otherwise hide mistakes in the paths they switch off."""
    torch.manual_seed(0)
    model = open_clip.create_model(request.param, pretrained=None).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or name == "logit_scale":
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=gen)
            elif t.dim() == 1:  # biases, norm scales and shifts, BN means, class embedding
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return request.param, model


@pytest.fixture(scope="module")
def converted(openclip_model):
    """Ours, converted with both heads, and both models' outputs on the same inputs."""
    name, reference = openclip_model
    ours = from_openclip(reference, simsiam=SimSiamConfig(64, 32), mlm=True).eval()
    images, tokens = _inputs(name)
    with torch.no_grad():
        outputs = {
            "reference": (reference.encode_image(images), reference.encode_text(tokens)),
            "ours": (ours.encode_image(images), ours.encode_text(tokens)),
        }
    return ours, outputs


def _inputs(name):
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 224, 224, generator=gen)
    tokens = open_clip.get_tokenizer(name)(["a photo of a cat on a red sofa", "diagram"])
    tokens[1, 3:9] = torch.randint(1, 49406, (6,), generator=gen)  # a longer, random caption
    tokens[1, 9] = 49407
    return images, tokens


def _assert_close(actual, expected):
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item()
    assert err <= TOL, (err, expected.abs().max().item())


def test_from_openclip_matches(openclip_model, converted):
    _, reference = openclip_model
    ours, outputs = converted
    assert not any(p.is_meta for p in ours.parameters())
    for actual, expected in zip(outputs["ours"], outputs["reference"]):
        _assert_close(actual, expected)
    assert ours.logit_scale.item() == reference.logit_scale.item()
    # The extra <mask> row sits after OpenCLIP's rows and is initialised like them.
    emb = ours.text.token_embedding.weight
    assert emb.shape[0] == MASK_ID + 1 == reference.token_embedding.num_embeddings + 1
    assert torch.equal(emb[:MASK_ID], reference.token_embedding.weight)
    assert 0.01 < emb[MASK_ID].std().item() < 0.04
    # No storage is shared: training ours would leave the OpenCLIP model alone.
    assert all(
        p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
        for p in ours.parameters()
        for q in reference.parameters()
    )


def test_to_openclip_state_dict_round_trips(openclip_model, converted):
    name, reference = openclip_model
    ours, outputs = converted
    assert ours.projector is not None and ours.mlm_head is not None
    state = to_openclip_state_dict(ours)
    assert not [k for k in state if k.startswith(("projector", "predictor", "mlm_head", "text."))]
    fresh = open_clip.create_model(name, pretrained=None).eval()
    fresh.load_state_dict(state, strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    images, tokens = _inputs(name)
    with torch.no_grad():
        _assert_close(fresh.encode_image(images), outputs["ours"][0])
        _assert_close(fresh.encode_text(tokens), outputs["ours"][1])


def test_preset_matches_openclip_architecture():
    """clip_vit_b16 (QuickGELU aside) has exactly OpenCLIP ViT-B-16's parameters."""
    ours = build("clip_vit_b16", device="meta")
    reference = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in to_openclip_state_dict(ours).items()} == expected


def test_unsupported_models_are_refused():
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.visual.transformer.resblocks[0].ls_1 = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="layer scale"):
        from_openclip(model)
    with pytest.raises(ValueError, match="unexpected OpenCLIP key"):
        openclip_to_declip_state_dict({"text_decoder.weight": torch.zeros(1)}, 49409)
