import pytest
from transformers import AutoConfig, GPTJConfig

from magma_hf import MagmaConfig, MagmaVisionConfig


def test_defaults_reproduce_magma_v1():
    config = MagmaConfig()
    text = config.text_config
    assert isinstance(text, GPTJConfig)
    assert (text.vocab_size, text.n_embd, text.n_layer, text.n_head, text.rotary_dim) == (50400, 4096, 28, 16, 64)
    assert text.n_positions == 2048 and text.activation_function == "gelu_new" and not text.tie_word_embeddings
    vision = config.vision_config
    assert isinstance(vision, MagmaVisionConfig)
    assert (vision.layers, vision.width, vision.image_size) == ([6, 8, 18, 8], 96, 384)
    assert vision.hidden_size == 3072 and config.num_image_tokens == 144
    assert config.adapter_config == {"mlp": {"adapter_type": "normal", "downsample_factor": 4, "add_layernorm": False}}
    assert config.image_token_id == 50257
    assert config.use_image_embed_layernorm and config.image_embed_dropout_prob == 0.1


def test_another_size_is_a_few_keyword_arguments():
    config = MagmaConfig(
        text_config={"n_embd": 256, "n_layer": 4, "n_head": 8, "rotary_dim": 16},
        vision_config={"layers": [2, 2, 2, 2], "width": 16, "image_size": 224},
        adapter_config={"attention": {"adapter_type": "parallel", "downsample_factor": 8}},
    )
    assert config.text_config.hidden_size == 256
    assert config.vision_config.hidden_size == 512 and config.num_image_tokens == 49
    assert config.adapter_config == {
        "attention": {"adapter_type": "parallel", "downsample_factor": 8, "add_layernorm": False}
    }


def test_round_trip_through_json(tmp_path):
    config = MagmaConfig(vision_config={"layers": [1, 2, 3, 4], "width": 8, "image_size": 96}, image_token_id=7)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MagmaConfig)
    assert loaded.vision_config.layers == [1, 2, 3, 4] and loaded.num_image_tokens == 9
    assert loaded.to_dict()["text_config"] == config.to_dict()["text_config"]
    assert loaded.adapter_config == config.adapter_config and loaded.image_token_id == 7


def test_empty_adapter_config_means_no_adapters():
    assert MagmaConfig(adapter_config={}).adapter_config == {}


@pytest.mark.parametrize(
    "adapter_config, message",
    [
        ({"ffn": {"adapter_type": "normal"}}, "unknown locations ['ffn']"),
        ({"mlp": {"adapter_type": "serial"}}, "'serial'"),
        ({"mlp": {"adapter_type": "normal", "scale": 2}}, "unknown keys ['scale']"),
        ({"mlp": {"adapter_type": "normal", "downsample_factor": 0}}, "positive integer"),
    ],
)
def test_bad_adapter_config_names_the_problem(adapter_config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MagmaConfig(adapter_config=adapter_config)


def test_bad_vision_config_and_image_token_are_rejected():
    with pytest.raises(Exception, match="multiple of 32"):
        MagmaVisionConfig(image_size=100)
    with pytest.raises(Exception, match="four positive block counts"):
        MagmaVisionConfig(layers=[1, 2, 3])
    with pytest.raises(Exception, match="outside the vocabulary"):
        MagmaConfig(image_token_id=50400)
