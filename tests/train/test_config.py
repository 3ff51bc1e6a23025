"""Config presets, dotted overrides and their errors."""

import pytest
import yaml

from declip_fast.losses.declip import PRESETS as LOSS_PRESETS
from declip_fast.train import config as C

PRESETS = ("demo", "clip_vit_b32", "declip_vit_b32", "declip_r50", "clip_r50")


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_has_the_run_keys(name):
    raw = yaml.safe_load(C.preset_path(name).read_text())
    assert {"run_dir", "steps", "checkpoint_every", "resume", "seed"} <= set(raw)
    cfg = C.load_config(name)
    assert cfg.model.preset in (name, "declip_tiny")
    if name.startswith("clip"):
        assert cfg.loss.clip == 1.0 and not (cfg.loss.mvs or cfg.loss.iss or cfg.loss.tss or cfg.loss.nns)
    if name != "demo":  # the paper recipe: AdamW, lr 1e-3, 2.5k warm-up, global batch 4096
        o = cfg.optim
        assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps) == (1e-3, (0.9, 0.98), 1e-8, 0.1, 2500)
        assert cfg.steps == 128_000 and cfg.data.batch_size * 32 == 4096


def test_overrides_parse_values_and_reach_nested_sections():
    cfg = C.load_config(
        "demo",
        [
            "steps=7",
            "optim.lr=3e-4",
            "optim.betas=[0.8, 0.9]",
            "data.augment.blur_p=0",
            "optim.grad_clip=null",
            "model.overrides={mlm: false}",
            "loss=clip",
        ],
    )
    assert cfg.steps == 7 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.augment.blur_p == 0 and cfg.optim.grad_clip is None
    assert cfg.model.overrides == {"mlm": False}
    assert cfg.loss.clip == LOSS_PRESETS["clip"]["clip"] and cfg.loss.mvs == 0


@pytest.mark.parametrize(
    "override, name",
    [
        ("stpes=3", "stpes"),
        ("optim.lrr=1", "optim.lrr"),
        ("data.augment.blurp=0", "data.augment.blurp"),
        ("loss.nsn=0", "loss.nsn"),
    ],
)
def test_unknown_keys_fail_with_their_dotted_name(override, name):
    with pytest.raises(ValueError, match=f"unknown config key.*{name.replace('.', '[.]')}"):
        C.load_config("demo", [override])


def test_bad_values_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="precision"):
        C.load_config("demo", ["precision=fp8"])
    with pytest.raises(ValueError, match="key.sub=value"):
        C.load_config("demo", ["steps"])
    with pytest.raises(FileNotFoundError, match="no config preset 'nope'"):
        C.load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        C.load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config("declip_r50", ["optim.name=lamb", "data.crop_scale=[0.3, 1.0]"])
    C.save_config(cfg, tmp_path / "config.yaml")
    assert C.load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.overrides.vision.widht=64", r"unknown config key\(s\): model[.]overrides[.]vision[.]widht"),
        ("model.overrides.vision.layers=two", r"model[.]overrides[.]vision[.]layers: expected a number"),
        ("model.overrides.vision.layers=2.5", r"model[.]overrides[.]vision[.]layers: expected an integer"),
        ("model.overrides.embed_dims=64", r"model[.]overrides[.]embed_dims"),
        ("model.preset=declip_huge", r"model[.]preset: unknown preset 'declip_huge'"),
        ("model.overrides.text.packed=maybe", r"model[.]overrides[.]text[.]packed: expected true or false"),
    ],
)
def test_model_section_is_typed_and_checked_at_parse_time(override, message):
    """Issue 19: a typo or a wrong type in model.* fails where the config is parsed, naming the
    dotted key, before anything is built or written."""
    with pytest.raises(ValueError, match=message):
        C.load_config("demo", [override])


def test_model_overrides_are_coerced_to_the_fields_types():
    cfg = C.load_config("demo", ["model.overrides.vision.layers=3", "model.overrides.text.width=3.2e1"])
    arch = cfg.model.architecture()
    assert arch.vision.layers == 3 and isinstance(arch.text.width, int) and arch.text.width == 32
    rn = C.load_config("demo", ["model.preset=declip_tiny_rn", "model.overrides.vision.layers=[1, 2, 1, 1]"])
    assert rn.model.architecture().vision.layers == (1, 2, 1, 1)
    for value, expected in (("false", False), ("off", False), ("true", True)):
        packed = C.load_config("demo", [f"model.overrides.text.packed={value}"]).model.architecture().text.packed
        assert packed is expected


def test_print_config_shows_the_resolved_model(capsys):
    from declip_fast import cli

    assert cli.main(["train", "demo", "model.overrides.vision.layers=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)  # the resolved model is a comment: the output still loads
    assert printed["model"]["overrides"] == {"vision": {"layers": 3}}
    resolved = yaml.safe_load("\n".join(line[4:] for line in out.splitlines() if line.startswith("#   ")))
    assert resolved["vision"]["layers"] == 3 and resolved["vision"]["width"] == 64


def test_the_demo_preset_names_its_data_files_and_demo_data_is_a_deprecated_alias():
    cfg = C.load_config("demo")
    assert (cfg.data.beton, cfg.eval.data, cfg.eval.classes) == (
        "data/demo/train.beton",
        "data/demo/test.beton",
        "data/demo/classes.json",
    )
    with pytest.warns(FutureWarning, match="demo_data is deprecated"):
        old = C.load_config("demo", ["demo_data=elsewhere"])
    assert (old.data.beton, old.eval.data, old.eval.classes) == (
        "elsewhere/train.beton",
        "elsewhere/test.beton",
        "elsewhere/classes.json",
    )
