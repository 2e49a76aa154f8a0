"""Config validation: named errors, derived fields, YAML/JSON round-trip, the registry."""

import pytest
from pydantic import ValidationError

from vlm_mamba import (
    BridgerConfig,
    LanguageConfig,
    LoRAConfig,
    VisionConfig,
    VLMambaConfig,
    get_config,
    list_models,
)


def _err(fn) -> str:
    with pytest.raises(ValidationError) as e:
        fn()
    return str(e.value)


def test_image_size_not_multiple_of_patch_names_both_fields():
    msg = _err(lambda: VisionConfig(img_size=225, patch_size=16))
    assert "img_size=225" in msg and "patch_size=16" in msg


def test_conv_stem_must_divide_the_patch():
    msg = _err(lambda: VisionConfig(img_size=48, patch_size=12, max_img_size=96, conv_stem=[8, 16, 32]))
    assert "conv_stem=[8, 16, 32]" in msg and "patch_size=12" in msg
    assert "conv_stem" in _err(lambda: VisionConfig(img_size=32, patch_size=8, conv_stem=[0]))
    assert VisionConfig(img_size=48, patch_size=16, conv_stem=[8, 16]).conv_stem == [8, 16]


def test_unknown_key_is_an_error_naming_it():
    msg = _err(lambda: LanguageConfig(vocab_size=100, d_modle=64))
    assert "d_modle" in msg


def test_bridge_width_mismatch_names_fields_and_values():
    msg = _err(
        lambda: VLMambaConfig(language=LanguageConfig(d_model=256), bridger=BridgerConfig(out_dim=512))
    )
    assert "bridger.out_dim=512" in msg and "language.d_model=256" in msg
    msg = _err(lambda: VLMambaConfig(vision=VisionConfig(d_model=128), bridger=BridgerConfig(in_dim=64)))
    assert "bridger.in_dim=64" in msg and "vision.d_model=128" in msg


def test_mamba2_headdim_must_divide_inner_width():
    msg = _err(lambda: LanguageConfig(ssm="mamba2", d_model=80, headdim=64))
    assert "headdim=64" in msg and "d_inner" in msg
    msg = _err(lambda: LanguageConfig(ssm="mamba2", d_model=128, headdim=32, ngroups=3))
    assert "ngroups=3" in msg


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: LanguageConfig(ssm="mamba3"), "ssm"),
        (lambda: LanguageConfig(d_model=0), "d_model"),
        (lambda: LanguageConfig(dt_rank=0), "dt_rank"),
        (lambda: LanguageConfig(dt_min=0.5, dt_max=0.1), "dt_min"),
        (lambda: VLMambaConfig(vision_mode="resampler"), "vision_mode"),
        (lambda: LoRAConfig(targets=["q_proj"]), "targets"),
        (lambda: LoRAConfig(targets=[]), "targets"),
        (lambda: LoRAConfig(rank=0), "rank"),
        (lambda: VLMambaConfig(language=LanguageConfig(vocab_size=100), eos_token_id=100), "eos_token_id"),
    ],
)
def test_invalid_values_name_the_field(make, field):
    assert field in _err(make)


def test_assignment_is_validated():
    cfg = VisionConfig(img_size=32, patch_size=8)
    with pytest.raises(ValidationError, match="patch_size"):
        cfg.patch_size = 7


def test_derived_fields():
    lang = LanguageConfig(vocab_size=50257, d_model=768, pad_vocab_size_multiple=8)
    assert lang.d_inner == 1536 and lang.dt_rank_value == 48 and lang.padded_vocab_size == 50264
    assert LanguageConfig(d_model=64, dt_rank=5).dt_rank_value == 5
    assert VisionConfig(img_size=224, patch_size=16).num_patches == 196
    cfg = VLMambaConfig(language=LanguageConfig(d_model=256), bridger=BridgerConfig(expansion_factor=3))
    assert cfg.bridger_hidden == 768  # bridger.d_model defaults to the language width


def test_yaml_and_json_round_trip(tmp_path):
    cfg = VLMambaConfig(
        vision=VisionConfig(img_size=64, patch_size=8, d_model=96),
        language=LanguageConfig(ssm="mamba2", d_model=128, headdim=32, vocab_size=1000),
        vision_mode="fuyu",
        lora=LoRAConfig(rank=4, targets=["in_proj", "x_proj"]),
    )
    assert VLMambaConfig.from_yaml(cfg.to_yaml()) == cfg
    assert VLMambaConfig.from_json(cfg.to_json()) == cfg
    cfg.to_yaml(tmp_path / "c.yaml")
    cfg.to_json(tmp_path / "c.json")
    assert VLMambaConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert VLMambaConfig.from_json(tmp_path / "c.json") == cfg


def test_registry_sizes():
    assert {"tiny", "demo", "small", "base"} <= set(list_models())
    base = get_config("base")
    assert (base.vision.img_size, base.vision.patch_size, base.vision.d_model, base.vision.n_layers) == (
        224,
        16,
        768,
        12,
    )
    assert (base.language.vocab_size, base.language.d_model, base.language.n_layers) == (50257, 768, 12)
    m2 = get_config("tiny", language={"ssm": "mamba2"}, vision_mode="fuyu")
    assert m2.language.ssm == "mamba2" and m2.vision_mode == "fuyu"
    with pytest.raises(KeyError, match="huge"):
        get_config("huge")
