"""Bad inputs to the model, the processor and the pipeline, as users make them: each gives an error naming the
problem (the size, length, id or file, and what was expected), and leaves the user's files as they were."""

import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from magma_hf import MagmaForConditionalGeneration, MagmaImageToTextPipeline, MagmaProcessor
from magma_hf.jobs import load_model_and_processor
from magma_hf.processing_magma import add_magma_special_tokens
from tests.helpers import files_unchanged, make_processor, make_tokenizer, random_image, tiny_config

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
    inputs = processor(images=[random_image(0)], text=["a cat " * 168], return_tensors="pt")
    prompt = inputs.input_ids.shape[1]
    assert 500 < prompt < 512  # a few steps from the limit
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


# ---------------------------------------------------------------------------------- processor and model disagree
def shifted_tokenizer():
    """A tokenizer with one more token before `<|image|>`: its image id is one past the tiny config's."""
    tokenizer = make_tokenizer(with_image_token=False)
    tokenizer.add_tokens(["<|other|>"])
    return add_magma_special_tokens(tokenizer)


@pytest.fixture(scope="module")
def mismatched_folder(tmp_path_factory, tokenizer):
    """A model folder whose saved processor maps `<|image|>` to another id than the model's config."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mismatched")
    MagmaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(folder)
    make_processor(shifted_tokenizer()).save_pretrained(folder)
    return folder


MISMATCH = r"maps <\|image\|> to id 321, the model's config.image_token_id is 320"


def test_pipeline_refuses_a_tokenizer_whose_image_id_differs(mismatched_folder):
    with files_unchanged(mismatched_folder), pytest.raises(ValueError, match=MISMATCH):
        pipeline("image-to-text", model=str(mismatched_folder), pipeline_class=MagmaImageToTextPipeline)


def test_evaluation_loader_refuses_a_tokenizer_whose_image_id_differs(mismatched_folder):
    with files_unchanged(mismatched_folder), pytest.raises(ValueError, match=MISMATCH):
        load_model_and_processor(mismatched_folder, device="cpu")


def test_no_image_token_at_all_hints_at_the_tokenizer(model):
    processor = make_processor(shifted_tokenizer())
    inputs = processor(images=[random_image(0)], text=["a cat"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"0 image tokens \(id 320\).*tokenizer probably maps <\|image\|> to another"):
        model(**inputs)


def folder_with_processor(folder, tokenizer, processor):
    torch.manual_seed(0)
    MagmaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_processor_at_another_image_size_is_named(tmp_path, tokenizer):
    folder = folder_with_processor(tmp_path, tokenizer, make_processor(tokenizer, image_size=96))
    pattern = r"image processor crops to 96x96, the model takes 64x64 \(vision_config.image_size\)"
    with files_unchanged(folder), pytest.raises(ValueError, match=pattern):
        pipeline("image-to-text", model=str(folder), pipeline_class=MagmaImageToTextPipeline)


def test_tokenizer_larger_than_the_vocabulary_is_named(tmp_path, tokenizer):
    larger = make_tokenizer()
    larger.add_tokens([f"<|extra{n}|>" for n in range(10)])
    folder = folder_with_processor(tmp_path, tokenizer, make_processor(larger))
    with pytest.raises(ValueError, match=r"the tokenizer has 331 tokens, more than the model's vocabulary .*327"):
        load_model_and_processor(folder, device="cpu")


# ------------------------------------------------------------------------------------------- pipeline image sources
@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tokenizer, processor):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipeline_model")
    MagmaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return pipeline("image-to-text", model=str(folder), pipeline_class=MagmaImageToTextPipeline)


def closed_port() -> int:
    with socket.socket() as probe:  # bound and closed again: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_pipeline_names_a_url_it_cannot_fetch_offline(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"http://127.0.0.1:{closed_port()}/cat.png"
    with pytest.raises(ValueError, match=rf"The image '{re.escape(url)}' could not be fetched .*HF_HUB_OFFLINE is set"):
        pipe(url, generate_kwargs={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=re.escape(url)):  # in a batch, and with a prompt, too
        pipe([random_image(0), url], text=["a", "b"], generate_kwargs={"max_new_tokens": 2})


def test_pipeline_names_a_missing_or_unreadable_image_file(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"The image 'no-such-cat.png' is not a file in "):
        pipe("no-such-cat.png", generate_kwargs={"max_new_tokens": 2})
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with files_unchanged(tmp_path), pytest.raises(ValueError, match=r"notes.png' is not an image file PIL can read"):
        pipe(str(notes), generate_kwargs={"max_new_tokens": 2})


def test_pipeline_still_reads_image_files(pipe, tmp_path):
    random_image(1).save(tmp_path / "cat.png")
    greedy = {"max_new_tokens": 2, "do_sample": False}
    from_file = pipe(str(tmp_path / "cat.png"), generate_kwargs=greedy)
    assert from_file == pipe(random_image(1), generate_kwargs=greedy)


def test_processor_names_an_image_source_it_cannot_read(processor, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = f"http://127.0.0.1:{closed_port()}/dog.jpg"
    with pytest.raises(ValueError, match=rf"The image '{re.escape(url)}' could not be fetched"):
        processor(images=[[random_image(0)], [url]], text=["a", "b"])
    with pytest.raises(ValueError, match=r"The image 'missing/dog.jpg' is not a file in "):
        processor(images=["missing/dog.jpg"], text=["a dog"])


def test_text_that_is_not_strings_is_named(processor):
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got int"):
        processor(images=[random_image(0)], text=5)
    with pytest.raises(TypeError, match=r"text\[1\] is bytes"):
        processor(images=[random_image(0), random_image(1)], text=["a cat", b"a dog"])


# ------------------------------------------------------------------------------------------ model folder files
@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tokenizer, processor):
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    MagmaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_model_folder_without_config_json_is_named(saved_folder, tmp_path):
    folder = Path(shutil.copytree(saved_folder, tmp_path / "model"))
    (folder / "config.json").unlink()  # today: the default config, GPT-J-6B, is built (24 GB) before anything fails
    with files_unchanged(folder), pytest.raises(OSError, match=r"model has no config.json: a MAGMA model folder"):
        MagmaForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize(
    "name, load",
    [
        ("generation_config.json", MagmaForConditionalGeneration.from_pretrained),  # today silently ignored
        ("tokenizer.json", MagmaProcessor.from_pretrained),  # today a bare JSONDecodeError
        ("tokenizer_config.json", MagmaProcessor.from_pretrained),
    ],
)
def test_a_truncated_json_file_is_named(saved_folder, tmp_path, name, load):
    folder = Path(shutil.copytree(saved_folder, tmp_path / "model"))
    text = (folder / name).read_text()
    (folder / name).write_text(text[: len(text) // 2])
    with files_unchanged(folder), pytest.raises(OSError, match=rf"{re.escape(name)} \(\d+ bytes: .*not valid JSON"):
        load(folder)


@pytest.mark.parametrize(
    "removed, named",
    [
        (["tokenizer.json"], "tokenizer.json"),  # today: transformers' advice to install sentencepiece or tiktoken
        (["tokenizer.json", "tokenizer_config.json"], "tokenizer.json .*, no tokenizer_config.json"),
        (["tokenizer_config.json"], "tokenizer_config.json"),  # today: loads, without an end-of-text token
        (["processor_config.json"], "processor_config.json"),  # today: "make sure ... preprocessor_config.json"
    ],
)
def test_a_model_folder_without_its_processor_files_names_them(saved_folder, tmp_path, removed, named):
    folder = Path(shutil.copytree(saved_folder, tmp_path / "model"))
    for name in removed:
        (folder / name).unlink()
    pattern = rf"{re.escape(str(folder))} has no {named}"
    loaders = [
        MagmaProcessor.from_pretrained,
        lambda path: load_model_and_processor(path, device="cpu"),
        lambda path: pipeline("image-to-text", model=str(path), pipeline_class=MagmaImageToTextPipeline),
    ]
    for load in loaders:
        with files_unchanged(folder), pytest.raises(OSError, match=pattern):
            load(folder)


# -------------------------------------------------------------------------------------- counts of texts and images
def test_image_lists_without_text_keep_their_grouping(processor):
    """One caption prompt per list of images; today `[[a, b], [c]]` became three prompts of one image each."""
    image_id, n = processor.image_token_id, processor.num_image_tokens
    images = [[random_image(0), random_image(1)], [random_image(2)]]
    inputs = processor(images=images, padding=True, return_tensors="pt")
    assert (inputs.input_ids == image_id).sum(1).tolist() == [2 * n, n]
    assert inputs.pixel_values.shape[0] == 3
    with pytest.raises(ValueError, match=r"images\[1\] is an empty list and there is no text for it"):
        processor(images=[[random_image(0)], []])  # today: dropped, one prompt for two lists


@pytest.mark.parametrize(
    "images, text, counts",
    [
        ([0, 1, 2], ["a", "b"], "3 images for 2 texts"),
        ([[0], [1]], ["a", "b", "c"], "2 lists of images for 3 texts"),
        ([[0], [1, 2]], "a", "2 lists of images for 1 texts"),
    ],
)
def test_texts_and_images_whose_counts_differ_are_refused_naming_both(processor, pipe, images, text, counts):
    def pictures(value):
        return [pictures(item) for item in value] if isinstance(value, list) else random_image(value)

    with pytest.raises(ValueError, match=re.escape(counts)):
        processor(images=pictures(images), text=text)
    with pytest.raises(ValueError, match=re.escape(counts)):
        pipe(pictures(images), text=text, generate_kwargs={"max_new_tokens": 1})
