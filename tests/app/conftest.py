"""The app's fixtures: a tiny MAGMA folder, the app served on 127.0.0.1, headless Chromium through Selenium."""

import os
import shutil

import pytest

from tests.app.chromium import ARTIFACTS, free_port, missing_browser, start_chromium
from tests.helpers import make_processor, make_tokenizer, random_image, save_tiny_magma

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the machine has no network: no calls home


@pytest.fixture(scope="session")
def app_folder(tmp_path_factory):
    """A tiny MAGMA folder (the package's export: carries its code) and a few images beside it."""
    root = tmp_path_factory.mktemp("app")
    tokenizer = make_tokenizer()
    save_tiny_magma(root / "magma", tokenizer, make_processor(tokenizer))
    for seed in (1, 2, 3):
        random_image(seed).save(root / f"image-{seed}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not a PNG")
    return root


@pytest.fixture(scope="session")
def loaded(app_folder):
    """The folder's model and processor as `magma-hf app` loads them, and the pipeline that is the reference."""
    from transformers import pipeline

    from magma_hf.jobs import load_model_and_processor

    model, processor = load_model_and_processor(app_folder / "magma", device="cpu")
    return model, processor, pipeline("image-text-to-text", model=model, processor=processor)


@pytest.fixture(scope="session")
def app_url(loaded, app_folder):
    """The app on 127.0.0.1, a free port, in this process, with one example image."""
    pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
    from magma_hf import app_magma

    model, processor, _ = loaded
    port = free_port()
    examples = [str(app_folder / "image-3.png")]
    page = app_magma.launch(
        model, processor, host="127.0.0.1", port=port, examples=examples, prevent_thread_lock=True, quiet=True
    )
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="session")
def browser():
    """Debian's headless Chromium driven by its chromedriver; skipped, saying what is missing, where they are not."""
    missing = missing_browser()
    if missing:
        pytest.skip(f"browser tests need {missing}")
    driver, profile = start_chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
