"""The factory: one source for the original's defaults, the MAGMA_v1 settings, the encoder shapes and the config that
the converter and training build from the same settings."""

from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from open_clip.modified_resnet import ModifiedResNet
from transformers import GPTJForCausalLM

from magma_hf import MagmaConfig
from magma_hf.configuration_magma import MagmaVisionConfig
from magma_hf.conversion.magma_checkpoint import CHECKPOINT_FILENAME, MagmaConversionError, convert_magma_checkpoint
from magma_hf.factory import (
    ENCODERS,
    MAGMA_V1_SETTINGS,
    MODEL_KEYS,
    ORIGINAL_DEFAULTS,
    encoder_vision_config,
    model_settings,
    read_magma_settings,
)
from magma_hf.modeling_magma import MagmaImageEncoder
from magma_hf.training.run import MagmaTrainingConfig, TrainingConfigError, build_model_and_processor
from magma_hf.weights_magma import gptj_name, is_magma_weight
from tests.helpers import files_unchanged, make_tokenizer, save_tiny_gptj
from tests.original_magma import deepspeed_checkpoint, original_state_dict, tiny_original_model

REPO_ROOT = Path(__file__).resolve().parents[2]
MAGMA_V1_YAML = REPO_ROOT / "configuration" / "MAGMA_v1.yml"
TEXT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 256}
VISION = {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64}


def test_magma_v1_settings_are_the_shipped_yaml_and_the_config_defaults():
    """The converter's default (which works installed, without the repository's configuration folder) is
    configuration/MAGMA_v1.yml's model keys, and MagmaConfig's defaults are MAGMA_v1's."""
    shipped = yaml.safe_load(MAGMA_V1_YAML.read_text())
    assert MAGMA_V1_SETTINGS == {key: shipped[key] for key in MODEL_KEYS}
    assert read_magma_settings() == read_magma_settings(MAGMA_V1_YAML)
    defaults = MagmaConfig()
    settings = read_magma_settings()
    assert settings["vision_config"] == {
        k: getattr(defaults.vision_config, k) for k in ("layers", "width", "image_size")
    }
    assert {k: v for k, v in settings.items() if k != "vision_config"} == {
        k: getattr(defaults, k)
        for k in ("adapter_config", "use_image_embed_layernorm", "image_embed_dropout_prob", "freeze_image_encoder")
    }


def test_the_original_defaults_are_its_multimodal_config_s():
    """magma/config.py: encoder_name "clip", no adapters, frozen encoder, no dropout, no layernorm."""
    assert ORIGINAL_DEFAULTS == {
        "encoder_name": "clip",
        "adapter_config": None,
        "freeze_img_encoder": True,
        "image_embed_dropout_prob": 0.0,
        "use_image_embed_layernorm": False,
    }
    settings = model_settings({"encoder_name": "clip_resnet"})
    assert settings["adapter_config"] == {} and settings["freeze_image_encoder"] is True
    assert settings["image_embed_dropout_prob"] == 0.0 and settings["use_image_embed_layernorm"] is False


@pytest.mark.parametrize("encoder_name", sorted(ENCODERS))
def test_encoder_shapes_are_open_clip_s(encoder_name):
    """Each supported encoder's layers, width and resolution are open_clip's, and the image encoder built from them
    has open_clip's ModifiedResNet's parameters (names and shapes), attention pooling aside."""
    open_clip_name = ENCODERS[encoder_name]
    vision_cfg = open_clip.get_model_config(open_clip_name)["vision_cfg"]
    vision = encoder_vision_config(encoder_name)
    assert vision == {
        "layers": vision_cfg["layers"],
        "width": vision_cfg["width"],
        "image_size": vision_cfg["image_size"],
    }
    with torch.device("meta"):
        ours = MagmaImageEncoder(MagmaVisionConfig(**vision)).state_dict()
        theirs = ModifiedResNet(vision["layers"], 1024, 32, vision["image_size"], vision["width"]).state_dict()
    theirs = {k: v.shape for k, v in theirs.items() if not k.startswith("attnpool.")}
    assert {k: v.shape for k, v in ours.items()} == theirs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer folder, a tiny GPT-J folder (training's lm_name) and a tiny original checkpoint."""
    root = tmp_path_factory.mktemp("factory")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    save_tiny_gptj(root / "gptj", tokenizer, vocab_size=len(tokenizer) + 6, n_positions=TEXT["n_positions"])
    original = tiny_original_model(len(tokenizer), image_size=64, adapter_config=MAGMA_V1_SETTINGS["adapter_config"])
    (root / "checkpoint").mkdir()
    torch.save(deepspeed_checkpoint(original_state_dict(original)), root / "checkpoint" / CHECKPOINT_FILENAME)
    return root, len(tokenizer) + 6


def training_values(root: Path, settings: dict) -> dict:
    return {
        **settings,
        "batch_size": 2,
        "train_steps": 1,
        "train_dataset_dir": str(root / "data"),
        "save": str(root / "run"),
        "tokenizer_name_or_path": str(root / "tokenizer"),
        "model_config": {"lm_name": str(root / "gptj"), "vision_config": VISION},
    }


def converted_config(root: Path, vocab_size: int, yaml_path: Path, output: Path) -> dict:
    convert_magma_checkpoint(
        root / "checkpoint" / CHECKPOINT_FILENAME,
        output,
        magma_config=yaml_path,
        text_config={**TEXT, "vocab_size": vocab_size},
        vision_config=VISION,
        tokenizer=root / "tokenizer",
        verify=False,
    )
    return MagmaConfig.from_pretrained(output).to_dict()


BOOKKEEPING = {"_name_or_path", "architectures", "dtype", "transformers_version", "auto_map", "custom_pipelines"}


def comparable(config: dict) -> dict:
    """A config's architecture and MAGMA settings, without what saving adds (its class, dtype, folder, code map)."""
    return {
        key: comparable(value) if isinstance(value, dict) and key.endswith("_config") else value
        for key, value in config.items()
        if key not in BOOKKEEPING
    }


def test_converter_and_training_build_the_same_config_from_the_same_settings(assets, tmp_path):
    root, vocab_size = assets
    settings = dict(MAGMA_V1_SETTINGS)
    (tmp_path / "magma.yml").write_text(yaml.safe_dump(settings))
    converted = converted_config(root, vocab_size, tmp_path / "magma.yml", tmp_path / "converted")
    model, processor, _ = build_model_and_processor(MagmaTrainingConfig.from_dict(training_values(root, settings)))
    assert comparable(model.config.to_dict()) == comparable(converted)
    assert processor.tokenizer.model_max_length == TEXT["n_positions"]


def test_a_yaml_without_encoder_name_is_refused_alike_by_converter_and_training(assets, tmp_path):
    """The original's default encoder_name is "clip", CLIP ViT-B/32, which MAGMA here does not implement: both the
    converter and training say so, naming the key, the default and what to set; neither writes anything. (Training
    used to build an RN50x16 instead, the converter to reject "clip" as unknown.)"""
    root, vocab_size = assets
    settings = {k: v for k, v in MAGMA_V1_SETTINGS.items() if k != "encoder_name"}
    (tmp_path / "magma.yml").write_text(yaml.safe_dump(settings))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    expected = r"encoder_name 'clip' \(the original's default when encoder_name is not set\) is CLIP ViT-B/32"
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(MagmaConversionError, match=expected) as error:
        converted_config(root, vocab_size, tmp_path / "magma.yml", tmp_path / "out")
    assert "clip_resnet_large" in str(error.value) and "magma.yml" in str(error.value)
    with files_unchanged(tmp_path, no_new_files=True), pytest.raises(TrainingConfigError, match=expected):
        build_model_and_processor(MagmaTrainingConfig.from_dict(training_values(root, settings)))


def test_an_unknown_encoder_names_the_supported_ones(assets):
    root, _ = assets
    with pytest.raises(TrainingConfigError, match=r"encoder_name 'RN51' is not known: .*'RN50x16'"):
        build_model_and_processor(MagmaTrainingConfig.from_dict(training_values(root, {"encoder_name": "RN51"})))


def test_a_new_model_is_built_ready_to_train_without_a_load_report(assets, caplog):
    """GPT-J's weights loaded, MAGMA's own new: transformers' report of the new weights (a hundred "missing" lines)
    is not shown, with no filter on its text; the training policy is applied by the factory (GPT-J frozen)."""
    import logging

    root, _ = assets
    values = training_values(root, MAGMA_V1_SETTINGS)
    with caplog.at_level(logging.WARNING):
        model, _, _ = build_model_and_processor(MagmaTrainingConfig.from_dict(values))
    reports = [r for r in caplog.records if r.name == "transformers.modeling_utils" or "LOAD REPORT" in r.getMessage()]
    assert not reports
    # nor the TP plan's verification, which transformers runs when the loading logger's level is set
    assert not [r.getMessage()[:80] for r in caplog.records if r.name.startswith("transformers.distributed")]
    assert not logging.getLogger("transformers.modeling_utils").filters
    assert logging.getLogger("transformers.modeling_utils").level == logging.NOTSET  # as it was
    gptj = GPTJForCausalLM.from_pretrained(root / "gptj").state_dict()
    for name, param in model.gptj_named_parameters():
        assert not param.requires_grad and torch.equal(param.detach(), gptj[gptj_name(name)]), name
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(is_magma_weight(name) for name in trainable)
    assert any(name.startswith("model.vision_tower.") for name in trainable)  # MAGMA_v1 trains its encoder


def test_pretrained_weights_that_do_not_fit_are_named(assets, monkeypatch):
    """An open_clip tower of another shape is an error naming the weight and both shapes, not a silent re-init."""
    import magma_hf.factory as factory

    root, _ = assets
    visual = ModifiedResNet([1, 1, 1, 1], 256, 4, 64, 16).state_dict()  # width 16, the model's is 8
    monkeypatch.setattr(factory, "open_clip_visual_state_dict", lambda name, pretrained: visual)
    values = training_values(root, MAGMA_V1_SETTINGS)
    values["model_config"] = {**values["model_config"], "pretrained": "openai"}
    with pytest.raises(
        TrainingConfigError,
        match=r"shape mismatch \['model\.vision_tower\.conv1\.weight: \(8, 3, 3, 3\) vs \(4, 3, 3, 3\)",
    ):
        build_model_and_processor(MagmaTrainingConfig.from_dict(values))


def test_a_tokenizer_folder_without_tokenizer_files_names_them(tmp_path):
    from magma_hf.factory import MagmaSettingsError, load_tokenizer

    (tmp_path / "config.json").write_text("{}")  # a model folder, its tokenizer not copied: today sentencepiece advice
    with pytest.raises(MagmaSettingsError, match=r"the folder has no tokenizer\.json \(nor vocab\.json and merges"):
        load_tokenizer(tmp_path)
