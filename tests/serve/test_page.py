"""The page at GET /, in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium)."""

import os
import shutil

import pytest
import torch

from p2ch_app.inference.pipeline import AnalysisSettings
from tests.serve.conftest import running, settings_for
from tests.serve.test_jobs import expected_json

TOKEN = "page-test-token-0123456789"


def browser():
    """A headless Chromium, or a skip with the reason (a failure under CI=true, where .ci/run installs it)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        reason = "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but no browser: {reason}")
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_page_uploads_a_ct_and_shows_the_detections(tmp_path, models, tiny_cts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from p2ch_app.serve.app import create_app

    driver = browser()
    app = create_app(settings_for(tmp_path / "results", token=TOKEN), models, torch.device("cpu"))
    try:
        with running(app) as url:
            driver.get(url + "/")
            assert driver.title == "nodule-serve"
            threshold = driver.find_element(By.ID, "threshold")
            threshold.clear()
            threshold.send_keys("0.1")
            driver.find_element(By.NAME, "keep_outside").click()
            driver.find_element(By.NAME, "recentre").click()
            driver.find_element(By.ID, "file").send_keys(str(tiny_cts["mha"]))
            driver.find_element(By.ID, "submit").click()
            # the server wants its token: the page asks for it
            prompt = WebDriverWait(driver, 30).until(expected_conditions.alert_is_present())
            prompt.send_keys(TOKEN)
            prompt.accept()
            WebDriverWait(driver, 120).until(lambda d: "Done" in d.find_element(By.ID, "status").text
                                             or "rror" in d.find_element(By.ID, "status").text)
            status = driver.find_element(By.ID, "status").text
            rows = [[td.text for td in row.find_elements(By.TAG_NAME, "td")]
                    for row in driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr")]
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return Array.from(document.images).every(i => i.complete)"))
            images = driver.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
            downloads = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "a.download")]
    finally:
        driver.quit()
    expected = expected_json(tmp_path, tiny_cts["mha"], models, AnalysisSettings(threshold=0.1, keep_outside=True,
                                                                               recentre=True), "tiny")["detections"]
    assert status.startswith("Done: series tiny"), status
    assert rows == [[str(d["rank"]), f"{d['x_mm']:.1f}", f"{d['y_mm']:.1f}", f"{d['z_mm']:.1f}",
                     f"{d['diameter_mm']:.1f}", f"{d['nodule_prob']:.3f}", "-"] for d in expected]
    assert len(images) == len(expected) and all(width > 0 for width in images)  # fetched with the token
    assert {"detections.json", "submission.csv", "index.html", "candidates.nii.gz"} <= set(downloads)


def test_the_page_is_self_contained(server):
    from p2ch_app.serve.client import Client

    status, headers, page = Client(server[0]).request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<script>" in page and b"<style>" in page
    assert b"http://" not in page and b"https://" not in page and b"src=\"//" not in page  # works offline
