"""Debian's headless Chromium through Selenium, and the app's page driven in it, for the app's tests and the README's
screenshot (tests/benchmarks/app_screenshot.py)."""

import shutil
import socket
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = (
    # root in a container, no network: without the background-networking flags Chromium waits on refused connections
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)  # fmt: skip

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "app"  # screenshots (git-ignored)

FINISHED = ("Done after", "Stopped after", "Cannot run this")  # how the app's message starts once a run ends


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_browser() -> str | None:
    """What is missing to drive Chromium (None: nothing)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "Selenium (pip install -e '.[dev]')"
    missing = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    if missing:
        return f"{' and '.join(missing)} on PATH (Debian: apt-get install chromium chromium-driver)"
    return None


def start_chromium():
    """A headless Chromium with a new empty profile; returns (driver, profile folder to remove after `quit`)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="magma-app-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=webdriver.ChromeService(shutil.which("chromedriver")), options=options), profile


def by_css(driver, selector: str, timeout: float = 30):
    """The first element `selector` matches, once the page shows one: Gradio renders asynchronously (an accordion's
    contents appear some time after the click), so looking once can miss an element that is on its way."""
    found = lambda: driver.find_elements("css selector", selector)  # noqa: E731
    wait_for(driver, found, f"an element matching {selector!r}", timeout)
    return found()[0]


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
    """Files into a gallery's file input (once it is there: an accordion just opened renders it), then waits until
    the gallery shows them."""
    file_input = lambda: driver.find_elements("css selector", f"#{gallery_id} input[type=file]")  # noqa: E731
    wait_for(driver, file_input, f"the file input of #{gallery_id}")
    file_input()[0].send_keys("\n".join(str(path) for path in paths))
    shown = lambda: len(driver.find_elements("css selector", f"#{gallery_id} .thumbnail-item img")) >= len(paths)  # noqa: E731
    wait_for(driver, shown, f"{len(paths)} images in #{gallery_id}")


def type_into(driver, textbox_id: str, text: str) -> None:
    box = by_css(driver, f"#{textbox_id} textarea")
    box.send_keys(text)  # a newline is Enter: a new line in a multi-line box
    assert box.get_attribute("value") == text


def paste_into(driver, textbox_id: str, text: str) -> None:
    """`text` into a textbox at once, as a paste does (typing a long text key by key takes many seconds)."""
    box = by_css(driver, f"#{textbox_id} textarea")
    script = "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
    driver.execute_script(script, box, text)
    assert box.get_attribute("value") == text


def generate(driver, screenshot) -> tuple[str, str]:
    """Clicks Generate, waits for the run to end, saves a screenshot at `screenshot`; returns (answer shown, message
    shown)."""
    by_css(driver, "#magma-run").click()
    message = lambda: by_css(driver, "#magma-message").text  # noqa: E731
    wait_for(driver, lambda: message().startswith(FINISHED), "the run to end")
    driver.save_screenshot(str(screenshot))
    return by_css(driver, "#magma-answer textarea").get_attribute("value"), message()


def full_prompt(driver) -> str:
    open_accordion(driver, "The prompt the model got")
    box = lambda: driver.find_elements("css selector", "#magma-full-prompt textarea")  # noqa: E731
    wait_for(driver, box, "the full prompt")
    return box()[0].get_attribute("value")
