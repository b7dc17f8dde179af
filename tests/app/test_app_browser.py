"""The app in a real browser: Debian's headless Chromium through Selenium, on a tiny MAGMA served on 127.0.0.1.

Each test drives the page as a user does (uploads, typing, the Generate button) and checks the text shown against
the pipeline's greedy output for the same input; screenshots go to test-artifacts/app/.
"""

import pytest

from magma_hf.app_magma import DEFAULT_MAX_NEW_TOKENS
from magma_hf.evaluation.prompts import build_prompt
from tests.app.chromium import (
    ARTIFACTS,
    by_css,
    full_prompt,
    generate,
    open_accordion,
    open_page,
    paste_into,
    type_into,
    upload,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("app_url", "browser")]

QUESTION = "What is in the picture?"


def pipeline_text(loaded, images, prompt: str) -> str:
    """The pipeline's greedy answer, with the app's default budget (the tiny folder's config sets none)."""
    _, _, pipe = loaded
    kwargs = {"do_sample": False, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    return pipe(images=[str(image) for image in images], text=prompt, generate_kwargs=kwargs)[0]["generated_text"]


def test_caption_and_question_equal_the_pipeline(browser, app_url, app_folder, loaded):
    image = app_folder / "image-1.png"
    open_page(browser, app_url)
    upload(browser, "magma-images", [image])
    caption, message = generate(browser, ARTIFACTS / "caption.png")
    assert message.startswith("Done after"), message
    assert caption == pipeline_text(loaded, [image], "")
    assert full_prompt(browser) == build_prompt("caption", "", [])

    type_into(browser, "magma-prompt", f"Q: {QUESTION} A:")
    answer, message = generate(browser, ARTIFACTS / "question.png")
    assert message.startswith("Done after"), message
    assert answer == pipeline_text(loaded, [image], f"Q: {QUESTION} A:")
    assert answer != caption  # the prompt reached the model
    assert full_prompt(browser) == build_prompt("vqa", QUESTION, [])


def test_two_image_prompt_equals_the_pipeline(browser, app_url, app_folder, loaded):
    images = [app_folder / "image-1.png", app_folder / "image-2.png"]
    prompt = "<|image|> a photo of a cat. <|image|> a photo of"
    open_page(browser, app_url)
    upload(browser, "magma-images", images)
    type_into(browser, "magma-prompt", prompt)
    answer, message = generate(browser, ARTIFACTS / "two-images.png")
    assert message.startswith("Done after"), message
    assert answer == pipeline_text(loaded, images, prompt)
    assert full_prompt(browser) == prompt


def test_few_shot_prompt_is_the_harness_layout_and_equals_the_pipeline(browser, app_url, app_folder, loaded):
    examples = [(app_folder / "image-2.png", "a dog running on the beach"), (app_folder / "image-3.png", "a red sofa")]
    query = app_folder / "image-1.png"
    open_page(browser, app_url)
    upload(browser, "magma-images", [query])
    open_accordion(browser, "Few-shot examples")
    upload(browser, "magma-example-images", [path for path, _ in examples])
    type_into(browser, "magma-example-texts", "\n".join(text for _, text in examples))
    answer, message = generate(browser, ARTIFACTS / "few-shot.png")
    assert message.startswith("Done after"), message
    expected_prompt = build_prompt("caption", "", [("", text) for _, text in examples])
    assert full_prompt(browser) == expected_prompt
    assert answer == pipeline_text(loaded, [path for path, _ in examples] + [query], expected_prompt)


@pytest.mark.parametrize(
    "images, prompt, expected",
    [
        ([], "", "Give an image (to caption it) or a prompt"),
        (["image-1.png", "image-2.png"], "<|image|> a photo of", "Too many images: 2 images and 1 <|image|>"),
        (["broken.png"], "", "broken.png' is not an image file PIL can read"),
        (["image-1.png"], "a photo of a cat " * 100, "Text too long for the model: the prompt is"),
    ],
    ids=["nothing", "too-many-images", "unreadable-file", "too-long"],
)
def test_bad_input_is_named_in_the_page(browser, app_url, app_folder, images, prompt, expected, request):
    open_page(browser, app_url)
    if images:
        upload(browser, "magma-images", [app_folder / name for name in images])
    if prompt:
        paste_into(browser, "magma-prompt", prompt)
    answer, message = generate(browser, ARTIFACTS / f"bad-input-{request.node.callspec.id}.png")
    assert message.startswith("Cannot run this"), message
    assert expected in message
    assert "Traceback" not in browser.page_source
    assert answer == ""


def test_an_example_image_captions_as_the_pipeline(browser, app_url, app_folder, loaded):
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    browser.find_element(By.CSS_SELECTOR, "#magma-examples button, #magma-examples td, #magma-examples img").click()
    shown = lambda: browser.find_elements("css selector", "#magma-images .thumbnail-item img")  # noqa: E731
    wait_for(browser, shown, "the example in the images")
    caption, message = generate(browser, ARTIFACTS / "example.png")
    assert message.startswith("Done after"), message
    assert caption == pipeline_text(loaded, [app_folder / "image-3.png"], "")


def test_the_answer_streams_and_stop_ends_it(browser, app_url, app_folder):
    open_page(browser, app_url)
    upload(browser, "magma-images", [app_folder / "image-1.png"])
    open_accordion(browser, "Generation settings")
    budget = by_css(browser, "#magma-max-new-tokens input[type=number]")
    budget.clear()
    budget.send_keys("480\t")  # the tiny model never ends a text by itself: it would run all 480 tokens
    by_css(browser, "#magma-run").click()
    answer = lambda: by_css(browser, "#magma-answer textarea").get_attribute("value")  # noqa: E731
    message = lambda: by_css(browser, "#magma-message").text  # noqa: E731
    wait_for(browser, lambda: answer() and message().startswith("Generating"), "the first words streamed")
    streamed = answer()
    by_css(browser, "#magma-stop").click()
    wait_for(browser, lambda: message().startswith("Stopped after"), "the stop")
    browser.save_screenshot(str(ARTIFACTS / "stopped.png"))
    assert answer().startswith(streamed.rstrip())
    assert len(answer().split()) < 470  # it stopped before the budget (each "s" is a token)
