"""The app in a real browser: Debian's headless Chromium through Selenium, on a tiny MAGMA served on 127.0.0.1.

Each test drives the page as a user does (uploads, typing, the Generate button) and checks the text shown against
the pipeline's greedy output for the same input; screenshots go to test-artifacts/app/.
"""

import pytest
from conftest import ARTIFACTS

from magma_hf.app_magma import DEFAULT_MAX_NEW_TOKENS
from magma_hf.evaluation.run import build_prompt

pytestmark = pytest.mark.usefixtures("app_url", "browser")

FINISHED = ("Done after", "Stopped after", "Cannot run this")
QUESTION = "What is in the picture?"


def by_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_for(driver, condition, what: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda _: condition(), message=f"waited {timeout} s for {what}")


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda: driver.find_elements("css selector", "#magma-run"), "the page")


def open_accordion(driver, label: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[contains(., '{label}')]").click()


def upload(driver, gallery_id: str, paths) -> None:
    """Files into a gallery's file input, then waits until the gallery shows them."""
    by_css(driver, f"#{gallery_id} input[type=file]").send_keys("\n".join(str(path) for path in paths))
    shown = lambda: len(driver.find_elements("css selector", f"#{gallery_id} .thumbnail-item img")) >= len(paths)  # noqa: E731
    wait_for(driver, shown, f"{len(paths)} images in #{gallery_id}")


def type_into(driver, textbox_id: str, text: str) -> None:
    box = by_css(driver, f"#{textbox_id} textarea")
    box.send_keys(text)  # a newline is Enter: a new line in a multi-line box
    assert box.get_attribute("value") == text


def generate(driver, name: str) -> tuple[str, str]:
    """Clicks Generate, waits for the run to end, saves a screenshot; returns (answer shown, message shown)."""
    by_css(driver, "#magma-run").click()
    message = lambda: by_css(driver, "#magma-message").text  # noqa: E731
    wait_for(driver, lambda: message().startswith(FINISHED), "the run to end")
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    return by_css(driver, "#magma-answer textarea").get_attribute("value"), message()


def full_prompt(driver) -> str:
    open_accordion(driver, "The prompt the model got")
    box = lambda: driver.find_elements("css selector", "#magma-full-prompt textarea")  # noqa: E731
    wait_for(driver, box, "the full prompt")
    return box()[0].get_attribute("value")


def pipeline_text(loaded, images, prompt: str) -> str:
    """The pipeline's greedy answer, with the app's default budget (the tiny folder's config sets none)."""
    _, _, pipe = loaded
    kwargs = {"do_sample": False, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
    return pipe(images=[str(image) for image in images], text=prompt, generate_kwargs=kwargs)[0]["generated_text"]


def test_caption_and_question_equal_the_pipeline(browser, app_url, app_folder, loaded):
    image = app_folder / "image-1.png"
    open_page(browser, app_url)
    upload(browser, "magma-images", [image])
    caption, message = generate(browser, "caption")
    assert message.startswith("Done after"), message
    assert caption == pipeline_text(loaded, [image], "")
    assert full_prompt(browser) == build_prompt("caption", "", [])

    type_into(browser, "magma-prompt", f"Q: {QUESTION} A:")
    answer, message = generate(browser, "question")
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
    answer, message = generate(browser, "two-images")
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
    answer, message = generate(browser, "few-shot")
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
        by_css(browser, "#magma-prompt textarea").send_keys(prompt)
    answer, message = generate(browser, f"bad-input-{request.node.callspec.id}")
    assert message.startswith("Cannot run this"), message
    assert expected in message
    assert "Traceback" not in browser.page_source
    assert answer == ""
