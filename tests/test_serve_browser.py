"""The search page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): search, badges, image upload, paging, the large view, more like this, and adding a
domain as admin. Screenshots go to $CMRKIT_SHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from test_serve import TOKEN, world  # noqa: E402,F401  (the tiny gallery and its two banks)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


def chrome(width: int, height: int):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def serve_in_thread(app):
    """uvicorn on a free loopback port in a daemon thread; returns (base url, server)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 30:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def _wait(driver, condition, timeout=30.0):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: condition(d))  # the grid is re-rendered under our feet


def test_page_search_upload_page_open_and_add_domain(world, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from cmrkit.serve.app import create_app
    from cmrkit.serve.engine import Engine

    world["index"].save(tmp_path / "index")
    engine = Engine(tmp_path / "index", tmp_path / "state")
    url, server = serve_in_thread(create_app(engine, TOKEN))
    shots = Path(os.environ.get("CMRKIT_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    driver = chrome(1280, 900)
    try:
        driver.get(f"{url}/?page_size=8")
        options = lambda d: d.find_elements(By.CSS_SELECTOR, "#domain option")  # noqa: E731
        _wait(driver, lambda d: len(options(d)) == 4)  # all + the three domains
        cards = lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .card")  # noqa: E731

        # Type a query: results with a score and a coloured adapter badge each.
        box = driver.find_element(By.ID, "q")
        box.send_keys("item 3", Keys.ENTER)
        _wait(driver, lambda d: len(cards(d)) == 8)
        first = cards(driver)[0]
        badge = first.find_element(By.CSS_SELECTOR, ".badge")
        assert badge.text == "t0" and "rgb" in badge.value_of_css_property("background-color")
        assert -1 <= float(first.find_element(By.CSS_SELECTOR, ".score").text) <= 1
        assert "24 results" in driver.find_element(By.ID, "status").text
        _wait(
            driver,
            lambda d: d.execute_script(
                "return [...document.images].filter(i => i.closest('.card'))"
                ".every(i => i.complete && i.naturalWidth > 0)"
            ),
        )

        # Page: the next ids' metadata comes from /api/items.
        driver.find_element(By.ID, "more").click()
        _wait(driver, lambda d: len(cards(d)) >= 16)
        driver.save_screenshot(str(shots / "desktop-results.png"))

        # Upload an image: it finds itself first.
        driver.find_element(By.ID, "q").clear()
        driver.find_element(By.ID, "file").send_keys(str(world["paths"][5]))
        _wait(driver, lambda d: cards(d) and cards(d)[0].get_attribute("data-id") == "blues/005")
        route = driver.find_element(By.ID, "route").text
        assert "image" in route and "uploaded image" in route

        # Open a result large, then "more like this".
        liked = cards(driver)[1].get_attribute("data-id")
        cards(driver)[1].click()
        _wait(driver, lambda d: d.find_element(By.ID, "viewer").is_displayed())
        assert driver.find_element(By.ID, "v-title").text.startswith("item ")
        assert liked in driver.find_element(By.ID, "v-meta").text
        assert driver.execute_script("return document.getElementById('v-img').naturalWidth") > 0
        driver.save_screenshot(str(shots / "desktop-viewer.png"))
        driver.find_element(By.ID, "v-like").click()
        _wait(driver, lambda d: not d.find_element(By.ID, "viewer").is_displayed())
        _wait(driver, lambda d: liked in d.find_element(By.ID, "route").text)
        _wait(driver, lambda d: len(cards(d)) >= 8)  # scrolling may have fetched more pages
        assert liked not in [c.get_attribute("data-id") for c in cards(driver)]

        # Admin: add a domain from bank2 and see the route counts change.
        driver.find_element(By.ID, "admin-toggle").click()
        line = lambda d, name: d.find_elements(  # noqa: E731
            By.CSS_SELECTOR, f'#routes .line[data-adapter="{name}"] .count'
        )
        _wait(driver, lambda d: line(d, "t0") and line(d, "t0")[0].text == "24")
        assert not line(driver, "t1")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "bank").send_keys(str(world["b2"]))
        driver.find_element(By.ID, "add-domain").click()
        _wait(driver, lambda d: d.find_element(By.ID, "job").text.startswith("Done"), 90)
        _wait(driver, lambda d: line(d, "t1") and int(line(d, "t1")[0].text) > 0)
        assert int(line(driver, "t0")[0].text) < 24
        assert "t0, t1" in driver.find_element(By.ID, "info").text
        driver.save_screenshot(str(shots / "desktop-admin.png"))

        # Phone width: the same page reads in two columns.
        driver.set_window_size(390, 844)
        driver.find_element(By.ID, "admin-close").click()
        box = driver.find_element(By.ID, "q")
        box.send_keys("item 7", Keys.ENTER)
        _wait(driver, lambda d: len(cards(d)) >= 8)
        xs = driver.execute_script(  # one read of the live grid (it grows as pages arrive)
            "return [...document.querySelectorAll('#grid .card')].slice(0, 4)"
            ".map(c => c.getBoundingClientRect().left)"
        )
        assert len(set(xs)) == 2  # two columns
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390  # nothing overflows sideways
        driver.save_screenshot(str(shots / "phone-results.png"))
    finally:
        driver.quit()
        server.should_exit = True
