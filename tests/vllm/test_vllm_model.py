"""MAGMA in vLLM against the transformers model: greedy tokens, first-token log-probabilities and texts of a mixed
batch (0, 1 and 2 images, with and without `<|image|>`) for every adapter layout, the offline helper's answers, and
the errors for bad input."""

import pytest
from reference_setup import ENGINE_KWARGS, LAYOUTS, MAX_IMAGES, NO_IMAGE_TOKEN

LOGPROB_TOLERANCE = 1e-3


def requests(reference, images) -> list[dict]:
    """The reference prompts as vLLM requests, all in one batch."""
    batch = []
    for prompt, indices in reference["prompts"]:
        request = {"prompt": prompt}
        if indices:
            request["multi_modal_data"] = {"image": [images[i] for i in indices]}
        batch.append(request)
    return batch


def comparable_text(text: str) -> str:
    """vLLM's detokenizer holds back a trailing incomplete UTF-8 sequence (shown as U+FFFD by a full decode) that a
    later token could complete; random byte-level tokens end in one often."""
    return text.rstrip("\ufffd")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_tokens_logprobs_and_texts_equal_the_transformers_model(layout, reference, reference_images, engines):
    from vllm import SamplingParams

    llm = engines(reference["dir"] / layout)
    params = SamplingParams(temperature=0.0, max_tokens=reference["max_new_tokens"], logprobs=0)
    outputs = llm.generate(requests(reference, reference_images), params, use_tqdm=False)
    assert len(outputs) == len(reference["prompts"])
    for (prompt, indices), output, expected in zip(reference["prompts"], outputs, reference["layouts"][layout]):
        where = f"{layout}: {prompt!r} with {len(indices)} image(s)"
        # the prompt as the processor lays it out: image tokens where <|image|> stands, or images in front
        assert len(output.prompt_token_ids) == expected["prompt_length"], where
        completion = output.outputs[0]
        assert list(completion.token_ids) == expected["token_ids"], where
        first = completion.logprobs[0][completion.token_ids[0]].logprob
        assert abs(first - expected["first_logprob"]) <= LOGPROB_TOLERANCE, f"{where}: {first} vs {expected}"
        assert comparable_text(completion.text) == comparable_text(expected["text"]), where


def test_offline_generator_answers_as_generate_answers(reference, reference_images, engines):
    from magma_hf.vllm.offline import VllmGenerator

    engines.close()  # the generator starts its own engine
    generator = VllmGenerator(reference["dir"] / "normal", reference["max_new_tokens"], **ENGINE_KWARGS)
    prompts = [prompt for prompt, _ in reference["prompts"]]
    images = [[reference_images[i] for i in indices] for _, indices in reference["prompts"]]
    assert generator(prompts, images) == reference["answers"]["normal"]
    with pytest.raises(ValueError, match="2 prompts and 1 image lists"):
        generator(prompts[:2], images[:1])
    del generator


@pytest.mark.parametrize(
    ("prompt", "n_images", "message"),
    [
        ("<|image|> a photo of", 2, r"1 <\|image\|> placeholders and 2 images"),
        ("<|image|> a cat <|image|> a", 1, r"2 <\|image\|> placeholders and 1 images"),
        ("a photo of", MAX_IMAGES + 1, rf"The prompt has {MAX_IMAGES + 1} images. At most {MAX_IMAGES} image"),
    ],
    ids=["more-images-than-placeholders", "fewer-images", "more-than-limit_mm_per_prompt"],
)
def test_a_bad_request_is_refused_naming_the_counts(prompt, n_images, message, reference, reference_images, engines):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = engines(reference["dir"] / "normal")
    images = [reference_images[n % len(reference_images)] for n in range(n_images)]
    with pytest.raises((ValueError, VLLMValidationError), match=message):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, SamplingParams(max_tokens=2))
    # the engine still answers after refusing
    assert llm.generate("a photo of", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_a_folder_whose_tokenizer_lacks_the_image_token_is_refused_at_load(reference, engines):
    from vllm import LLM

    engines.close()
    with pytest.raises(Exception, match=r"has no '<\|image\|>' token") as error:
        LLM(model=str(reference["dir"] / NO_IMAGE_TOKEN), **ENGINE_KWARGS)
    assert "add_magma_special_tokens" in str(error.value)
