"""Bad inputs to the model, the processor and the pipeline, as users make them: each gives an error naming the
problem (the size, length, id or file, and what was expected), and leaves the user's files as they were."""

import pytest
import torch
from helpers import files_unchanged, random_image

from magma_hf import MagmaForConditionalGeneration

N_TOKENS = 4  # tiny config: 64 px images, (64 / 32) ** 2 image tokens


def image_prompt(config, text_ids=(5, 6)) -> torch.Tensor:
    return torch.tensor([[config.image_token_id] * N_TOKENS + list(text_ids)])


# ------------------------------------------------------------------------------------------------- pixel values
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 96, 96),  # 9 image tokens: today it ran when the text had 9 placeholders
        (1, 3, 32, 32),
        (1, 3, 64, 96),
        (1, 1, 64, 64),  # grayscale without the RGB conversion
        (3, 64, 64),  # one image without its batch dimension
    ],
)
def test_pixel_values_at_another_size_name_the_size_expected(model, shape):
    n_tokens = (shape[-2] // 32) * (shape[-1] // 32) if len(shape) == 4 else N_TOKENS
    input_ids = torch.tensor([[model.config.image_token_id] * n_tokens + [5]])  # as many placeholders as tokens
    pattern = rf"pixel_values has shape \[{', '.join(map(str, shape))}\]; this model takes \[n_images, 3, 64, 64\]"
    with pytest.raises(ValueError, match=pattern + r" \(vision_config.image_size 64\)"):
        model(input_ids=input_ids, pixel_values=torch.randn(*shape))


def test_size_is_checked_before_the_encoder_runs(model):
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model.get_image_features(torch.randn(2, 3, 96, 96))
    assert calls == []


def test_integer_pixels_are_refused(model):
    pixels = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"pixel_values are torch.uint8; this model takes floating-point pixels"):
        model(input_ids=image_prompt(model.config), pixel_values=pixels)


# ------------------------------------------------------------------------------------------------------ length
def test_forward_longer_than_n_positions_names_length_and_limit(model):
    limit = model.config.text_config.n_positions
    with pytest.raises(ValueError, match=rf"The sequence is {limit + 1} tokens long, more than the {limit} positions"):
        model(input_ids=torch.full((1, limit + 1), 5))
    assert model(input_ids=torch.full((1, limit), 5)).logits.shape[1] == limit  # the limit itself fits


def test_processor_output_longer_than_n_positions_names_the_images(model, processor):
    inputs = processor(images=[random_image(0)], text=["a cat " * 300], return_tensors="pt")
    length = inputs.input_ids.shape[1]
    assert length > model.config.text_config.n_positions
    pattern = rf"is {length} tokens long \(1 image\(s\) of 4 tokens each\), more than the 512 positions"
    with pytest.raises(ValueError, match=pattern):
        model(**inputs)


def test_generation_past_n_positions_names_cache_and_new_tokens(model, processor):
    inputs = processor(images=[random_image(0)], text=["a cat " * 100], return_tensors="pt")
    prompt = inputs.input_ids.shape[1]
    with pytest.raises(ValueError, match=r"is 513 tokens long \(512 cached \+ 1 new\).*lower max_new_tokens"):
        model.generate(**inputs, max_new_tokens=600 - prompt, do_sample=False, eos_token_id=None)
    generated = model.generate(**inputs, max_new_tokens=512 - prompt, do_sample=False, eos_token_id=None)
    assert generated.shape[1] == 512  # up to the limit it runs


# ------------------------------------------------------------------------------------------------ weight files
@pytest.mark.parametrize("damage", ["truncated", "empty", "html"])
def test_a_damaged_weight_shard_is_named(tmp_path, config, damage):
    torch.manual_seed(0)
    MagmaForConditionalGeneration(config).save_pretrained(tmp_path, max_shard_size="300KB")
    shard = tmp_path / "model-00002-of-00005.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "html": b"<html>404</html>"}[damage])
    with files_unchanged(tmp_path), pytest.raises(OSError, match=r"model-00002-of-00005.safetensors \(\d+ bytes"):
        MagmaForConditionalGeneration.from_pretrained(tmp_path)


def test_a_missing_weight_shard_is_named(tmp_path, config):
    torch.manual_seed(0)
    MagmaForConditionalGeneration(config).save_pretrained(tmp_path, max_shard_size="300KB")
    (tmp_path / "model-00003-of-00005.safetensors").unlink()
    with files_unchanged(tmp_path), pytest.raises(OSError, match="model-00003-of-00005.safetensors"):
        MagmaForConditionalGeneration.from_pretrained(tmp_path)
