"""The web demo (scripts/app.py), used as a person would: in a real browser (headless Debian Chromium).

The browser test needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium and
/usr/bin/chromedriver; override with $CHROMIUM and $CHROMEDRIVER) and the Python packages gradio and
selenium. Without them it is skipped, unless $SHOW_ATTEND_TELL_REQUIRE_BROWSER is set (CI sets it), in
which case it fails. $APP_SCREENSHOT_DIR, if set, receives the screenshots, to look at.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script
from PIL import Image
from serve_tiny_model import save_example_images, save_tiny_model, trained_tiny_captioner

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_BROWSER = bool(os.environ.get("SHOW_ATTEND_TELL_REQUIRE_BROWSER") or os.environ.get("CI"))
WAIT = 60  # seconds any single step in the page may take (first captions include model warm-up)

pytestmark = pytest.mark.slow


def require(condition: bool, reason: str) -> None:
    if not condition:
        if REQUIRE_BROWSER:
            pytest.fail(f"{reason} ($SHOW_ATTEND_TELL_REQUIRE_BROWSER is set)")
        pytest.skip(reason)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_app_refuses_a_missing_model_folder(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "app.py"), "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "not a folder" in done.stderr and "Traceback" not in done.stderr


def test_search_tab_searches_a_caption_index(tmp_path):
    """The Search tab's handler over `app.py --index` (and --examples): the IndexedRetriever's hits, in order."""
    pytest.importorskip("tantivy")
    from show_attend_tell.caption_index import CaptionIndexError
    from show_attend_tell.retrieval import IndexedRetriever
    from show_attend_tell.serve import Captioner

    app = load_script("app")
    tiny = trained_tiny_captioner()
    model_dir = save_tiny_model(tmp_path / "model")
    examples = tmp_path / "examples"
    save_example_images(examples, count=8)
    index = tmp_path / "examples.index"
    build = ["build", "--model", str(model_dir), "--index", str(index), str(examples), "--no-progress"]
    assert load_script("search_images").main([*build, "--num-beams", "3", "--num-return-sequences", "3"]) == 0
    captioner = Captioner(tiny.model, tiny.processor)

    for folder in (None, examples):  # the index alone, and with the examples' cached features
        retriever, offered = app.make_retriever(captioner, folder, index, tmp_path / "cache")
        assert isinstance(retriever, IndexedRetriever) and len(offered) == (8 if folder else 0)
        expected = IndexedRetriever(tiny.model, tiny.processor, index)
        for query in ("a large green star", "a small red circle above a blue square"):
            pictures, figure, warning = app.search_pictures(retriever, query, 3)
            hits = expected.search(query, top_k=3).hits
            assert warning is None and len(pictures) == len(hits) > 0
            for (picture, label), hit in zip(pictures, hits, strict=True):
                assert label == f"#{hit.rank} {hit.image_id} ({hit.score:.2f})"
                with Image.open(hit.image_id) as original:
                    assert picture.size == original.size
            assert len(figure.axes) >= len(hits)
    pictures, _, warning = app.search_pictures(retriever, "the of a", 3)
    assert pictures == [] and "only common words" in warning
    with pytest.raises(ValueError, match="Type a sentence"):
        app.search_pictures(retriever, "  ", 3)
    with pytest.raises(ValueError, match="Nothing to search"):
        app.search_pictures(None, "a star", 3)
    with pytest.raises(CaptionIndexError, match="no caption index"):
        app.make_retriever(captioner, None, tmp_path / "missing.index")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory) -> Iterator[str]:
    """scripts/app.py started as a user would, on 127.0.0.1, with the tiny model and six example pictures."""
    require(_importable("gradio"), 'gradio is not installed (pip install -e ".[app]")')
    root = tmp_path_factory.mktemp("app")
    model_dir = save_tiny_model(root / "model")
    examples = root / "examples"
    save_example_images(examples, count=6)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [
        sys.executable,
        str(REPO / "scripts" / "app.py"),
        "--model",
        str(model_dir),
        "--examples",
        str(examples),
        "--port",
        str(port),
        "--cache-dir",
        str(root / "cache"),
    ]
    log = (root / "app.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited: {(root / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer in time: {(root / 'app.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


@pytest.fixture
def browser() -> Iterator[object]:
    require(_importable("selenium"), "selenium is not installed (pip install selenium)")
    require(Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    require(
        Path(CHROMEDRIVER).is_file(), f"no ChromeDriver at {CHROMEDRIVER} (apt-get install chromium-driver)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # Headless, no sandbox (CI runs as root), and none of Chromium's own network traffic (updates, sync,
    # safe browsing), which a closed network refuses slowly.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1300",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # The explicit driver path also keeps Selenium Manager from trying to download a driver.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, tmp_path: Path, name: str) -> np.ndarray:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("APP_SCREENSHOT_DIR"):
        target = Path(os.environ["APP_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB"))


def loaded_image(driver, selector: str):
    """The <img> under `selector` once the browser has decoded it (natural width > 0)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        for element in d.find_elements(By.CSS_SELECTOR, selector):
            if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", element):
                return element
        return False

    return WebDriverWait(driver, WAIT).until(ready)


def test_caption_and_search_in_a_browser(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from show_attend_tell.serve import Captioner, CaptionOptions

    wait = WebDriverWait(browser, WAIT)
    browser.get(app_url)
    wait.until(lambda d: "Show, Attend and Tell" in d.title)  # set by the page's script once it runs

    # Upload a picture, as a person choosing a file would.
    picture = tmp_path / "upload.png"
    tiny = trained_tiny_captioner()
    image = tiny.dataset["test"][7]["image"].convert("RGB")
    image.save(picture)
    file_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
    file_input.send_keys(str(picture))
    caption_box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption textarea"))
    caption = wait.until(lambda d: caption_box.get_attribute("value"))
    figure = loaded_image(browser, "#figure img")

    # The page shows what the model says for this picture with the page's settings (beam 3, 50 words).
    captioner = Captioner(tiny.model, tiny.processor)
    options = CaptionOptions(captioner.default_num_beams, captioner.default_max_new_tokens, True)
    (expected,) = captioner.caption_batch([image], options)
    assert caption == expected.caption and len(caption.split()) >= 2
    # The figure has the picture and one panel per word, in rows of five: wider than a single panel.
    assert int(figure.get_attribute("naturalWidth")) >= 5 * 150
    pixels = screenshot(browser, tmp_path, "app_caption.png")
    assert pixels.std() > 20, "the screenshot is (nearly) blank"

    # Change the beam size through the slider's number box, caption again with the button.
    beams = browser.find_element(By.CSS_SELECTOR, "#beams input[type=number]")
    beams.clear()
    beams.send_keys("1\t")
    browser.find_element(By.CSS_SELECTOR, "#caption-button").click()
    (greedy,) = captioner.caption_batch([image], CaptionOptions(1, captioner.default_max_new_tokens, True))
    wait.until(lambda d: caption_box.get_attribute("value") == greedy.caption)

    # Search tab: type a sentence, see the best example pictures and the attention figure.
    tab = next(
        b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Search"
    )
    tab.click()
    query = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea"))
    query.send_keys("a large green star")
    browser.find_element(By.CSS_SELECTOR, "#search-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#hits img")) >= 4)
    labels = [
        e.text for e in browser.find_elements(By.CSS_SELECTOR, "#hits .caption-label, #hits figcaption")
    ]
    assert any(label.startswith("#1 shapes_") for label in labels), labels
    search_figure = loaded_image(browser, "#search-figure img")
    assert int(search_figure.get_attribute("naturalHeight")) > 400  # four rows of pictures
    pixels = screenshot(browser, tmp_path, "app_search.png")
    assert pixels.std() > 20
