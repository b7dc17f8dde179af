"""MagmaProcessor keeps transformers' processor contract: decoding is the tokenizer's, the kwargs class and the
placeholder-mismatch message are the standard ones, and saving leaves the live processor as it was."""

import pytest
import torch

from magma_hf import MagmaImageProcessor, MagmaProcessor
from tests.helpers import IMAGE, make_processor, random_image


def generated_caption(processor) -> list[int]:
    """Left padding, the image tokens, a caption, end-of-text and what a batch generates after it."""
    tokenizer = processor.tokenizer
    eos, image = tokenizer.eos_token_id, processor.image_token_id
    caption = tokenizer("a dog on the beach", add_special_tokens=False).input_ids
    after = tokenizer(" junk", add_special_tokens=False).input_ids
    return [eos, eos] + [image] * processor.num_image_tokens + caption + [eos] + after


@pytest.mark.parametrize("skip_special_tokens", [None, False, True])
def test_decode_and_batch_decode_are_the_tokenizers(processor, skip_special_tokens):
    sequence = generated_caption(processor)
    kwargs = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
    batch = torch.tensor([sequence, sequence[::-1]])
    assert processor.decode(sequence, **kwargs) == processor.tokenizer.decode(sequence, **kwargs)
    assert processor.batch_decode(batch, **kwargs) == processor.tokenizer.batch_decode(batch, **kwargs)
    assert " junk" in processor.decode(sequence, **kwargs)  # nothing cut at end-of-text


def test_post_processing_is_magmas_clean_up(processor):
    sequence = generated_caption(processor)
    assert processor.post_process_image_text_to_text([sequence]) == ["a dog on the beach"]
    assert processor.post_process_image_text_to_text(torch.tensor([sequence] * 2)) == ["a dog on the beach"] * 2
    assert processor.post_process_image_text_to_text(torch.tensor(sequence)) == ["a dog on the beach"]


def test_kwargs_class_has_the_conventional_name():
    from magma_hf.processing_magma import MagmaProcessorKwargs

    assert MagmaProcessor.valid_processor_kwargs is MagmaProcessorKwargs


STANDARD_MISMATCH = r"The total number of <\|image\|> tokens in the prompts should be the same as the number of images"


@pytest.mark.parametrize(
    "images, text, found",
    [
        ([0, 1, 2], ["a", "b"], r"Found total 0 <\|image\|> tokens and 3 images"),
        ([[0], [1], [2]], ["a", "b"], r"Found total 0 <\|image\|> tokens and 3 images"),
    ],
)
def test_image_and_placeholder_mismatch_raises_the_standard_message(processor, images, text, found):
    images = [[random_image(n) for n in item] if isinstance(item, list) else random_image(item) for item in images]
    with pytest.raises(ValueError, match=f"{STANDARD_MISMATCH}.*{found}"):
        processor(images=images, text=text)


def test_images_of_one_prompt_never_move_to_another(processor):
    """The totals agree (3 and 3), but the first prompt's second image would end up in the second prompt."""
    images = [[random_image(0), random_image(1)], [random_image(2)]]
    with pytest.raises(ValueError, match=r"text\[0\] has 1 <\|image\|> tokens and 2 images"):
        processor(images=images, text=[f"{IMAGE} one", f"{IMAGE}{IMAGE} two"])


def test_saving_leaves_the_live_processor_as_the_reloaded_one(tmp_path):
    processor = make_processor()
    before = processor.to_dict()
    tokenizer_kwargs = dict(processor.tokenizer.init_kwargs)
    processor.save_pretrained(tmp_path)
    assert processor.to_dict() == before
    assert processor.tokenizer.init_kwargs == tokenizer_kwargs
    assert '"auto_map"' in (tmp_path / "processor_config.json").read_text()  # the saved folder still carries it
    reloaded = MagmaProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == before
    reloaded.save_pretrained(tmp_path / "again")
    assert reloaded.to_dict() == before


def test_num_multimodal_tokens_are_those_the_processor_call_inserts(processor):
    """`_get_num_multimodal_tokens`, which vLLM and transformers' processor tests ask of a processor (as LLaVA's has
    it): per image, the image tokens a call inserts for an image of that `(height, width)`, and one patch."""
    image_sizes = [(100, 100), (300, 100), (500, 30), (213, 167)]
    images = [[random_image(n, size=(width, height))] for n, (height, width) in enumerate(image_sizes)]
    inputs = processor(
        text=[f"{IMAGE} lower newer"] * len(images), images=images, padding=True, return_mm_token_type_ids=True
    )
    inserted = [ids.count(processor.image_token_id) for ids in inputs["input_ids"]]
    data = processor._get_num_multimodal_tokens(image_sizes=image_sizes)
    assert data["num_image_tokens"] == inserted == [sum(types) for types in inputs["mm_token_type_ids"]]
    assert data["num_image_patches"] == [1] * len(image_sizes)
    larger = MagmaProcessor(image_processor=MagmaImageProcessor(image_size=96), tokenizer=processor.tokenizer)
    assert larger._get_num_multimodal_tokens(image_sizes=image_sizes[:1])["num_image_tokens"] == [9]  # (96 / 32)²
    assert "num_image_tokens" not in processor._get_num_multimodal_tokens()
