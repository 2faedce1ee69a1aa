"""The Gradio web UI end to end in a real headless Chromium: upload an image, ask, read the answer on the page.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them); skips, saying so,
when they are absent. Set ``VQAKIT_UI_SCREENSHOT=path.png`` to keep a screenshot of the answered page.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="headless Chromium not installed: apt-get install -y chromium chromium-driver (Debian) to run the "
           "web UI browser test",
)
pytest.importorskip("gradio")
pytest.importorskip("selenium")
LABELS = {"yes", "no", "red", "circle", "2"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    import uvicorn

    from vqakit.inference.predict import VQAPredictor
    from vqakit.serve.app import VQAService, create_app

    examples_dir = tmp_path_factory.mktemp("examples")
    Image.fromarray(np.full((64, 64, 3), (200, 30, 30), np.uint8)).save(examples_dir / "red.png")
    predictor = VQAPredictor.from_pretrained(tiny_checkpoint, device="cpu", backend="torch")
    app = create_app(VQAService(predictor), ui=True, ui_examples=[[str(examples_dir / "red.png"), "what color?"]])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_ask_and_read_the_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    wait = WebDriverWait(browser, 60)
    browser.get(f"{server}/ui/")
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#vqa-image input[type=file]")))
    upload.send_keys(str(image))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#vqa-image img")))  # the upload is shown
    question = browser.find_element(By.CSS_SELECTOR, "#vqa-question textarea")
    question.send_keys("what is the color of the shape?")
    browser.find_element(By.CSS_SELECTOR, "#vqa-ask").click()

    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-answer").text.strip() or None)
    top = answer.splitlines()[0].strip()
    assert top in LABELS, answer
    assert "score 0." in answer or "score 1." in answer
    top5 = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-top5").text.strip() or None)
    assert top in top5 and sum(label in top5 for label in LABELS) == 5  # all five answers with their scores
    heatmap = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#vqa-heatmap img")))
    assert heatmap.get_attribute("src")
    if os.environ.get("VQAKIT_UI_SCREENSHOT"):
        browser.save_screenshot(os.environ["VQAKIT_UI_SCREENSHOT"])

    # the same answer as the REST API gives for the same file and question
    import httpx

    with open(image, "rb") as f:
        rest = httpx.post(f"{server}/predict/upload", files={"file": ("upload.png", f, "image/png")},
                          data={"question": "what is the color of the shape?"}, timeout=30).json()
    assert rest["predictions"][0]["answer"] == top


def test_an_example_image_can_be_picked(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{server}/ui/")
    # Gradio draws examples with several inputs as a table, one row per example (single-input ones: a gallery)
    example = wait.until(lambda d: next(iter(d.find_elements(By.CSS_SELECTOR, "tr.tr-body, .gallery-item")), None))
    example.click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-question textarea").get_attribute("value")
               == "what color?")
    browser.find_element(By.CSS_SELECTOR, "#vqa-ask").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#vqa-answer").text.strip() or None)
    assert answer.splitlines()[0].strip() in LABELS


def test_asking_without_an_image_says_so(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{server}/ui/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vqa-ask"))
    browser.find_element(By.CSS_SELECTOR, "#vqa-question textarea").send_keys("what shape?")
    browser.find_element(By.CSS_SELECTOR, "#vqa-ask").click()
    wait.until(lambda d: "Upload an image" in d.find_element(By.TAG_NAME, "body").text)


def test_rest_api_is_served_next_to_the_ui(server):
    import httpx

    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{server}/", timeout=10, follow_redirects=False).headers["location"] == "/ui/"
