"""The README's screenshot of the app, after `make demo`:
`python -m tests.benchmarks.app_screenshot [demo-output] [docs/app-screenshot.png]`.

Serves the app on the demo's model (its held-out images as examples), asks a question about a held-out digit,
greedy, in headless Chromium, and saves the page. Prints the answer shown."""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from magma_hf import app_magma  # noqa: E402
from magma_hf.jobs import load_model_and_processor  # noqa: E402
from tests.app.chromium import (  # noqa: E402
    by_css,
    free_port,
    generate,
    missing_browser,
    open_accordion,
    open_page,
    start_chromium,
    type_into,
    upload,
)

QUESTION = "Q: Is this number odd? A:"


def main(demo_output: str = "demo-output", screenshot: str = "docs/app-screenshot.png") -> None:
    if missing_browser():
        raise SystemExit(f"needs {missing_browser()}")
    images = app_magma.example_images_in([Path(demo_output) / "data" / "test" / "images"])
    model, processor = load_model_and_processor(Path(demo_output) / "magma", device="cpu")
    port = free_port()
    page = app_magma.launch(model, processor, host="127.0.0.1", port=port, examples=images[1:],
                            prevent_thread_lock=True, quiet=True)  # fmt: skip
    driver, profile = start_chromium()
    try:
        open_page(driver, f"http://127.0.0.1:{port}/")
        upload(driver, "magma-images", [Path(images[0]).resolve()])
        type_into(driver, "magma-prompt", QUESTION)
        open_accordion(driver, "Generation settings")
        if by_css(driver, "#magma-sample input").is_selected():
            by_css(driver, "#magma-sample input").click()  # greedy
        answer, message = generate(driver, screenshot)
        driver.set_window_size(1280, 1300)  # the whole page, from the top
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(screenshot)
        print(f"{images[0]}: {answer!r} ({message})")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        page.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
