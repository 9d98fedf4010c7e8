"""The web page in a real browser: Debian's ``chromium`` driven by the ``playwright`` package.

No browser is downloaded: playwright launches the Debian binary (``make install`` installs it
when run as root). A missing chromium fails these tests with the install command; it never
skips them. uvicorn serves the app on a free 127.0.0.1 port in a thread for the module.

    pytest tests/test_browser.py --screenshot                      # also writes docs/screenshot.png
    pytest tests/test_browser.py --screenshot --screenshot-index runs/demo/index --screenshot-query "a cat"
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from clipdistill.serve.app import create_app
from test_service import ensure_service_index, png_bytes

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "screenshot.png"
INSTALL_HINT = (
    "install Debian's chromium: `sudo apt-get install chromium` (or `make install` as root, which installs "
    "the Makefile's APT_PACKAGES); set CLIPDISTILL_CHROMIUM=/path/to/chromium to use another binary"
)


DEBIAN_CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> str:
    candidates = [os.environ.get("CLIPDISTILL_CHROMIUM"), shutil.which("chromium"), DEBIAN_CHROMIUM]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"the browser test needs chromium, which is not installed: {INSTALL_HINT}", pytrace=False)


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, shapes_dataset_dir: Path) -> Iterator[str]:
    index = ensure_service_index(tmp_path_factory.getbasetemp(), shapes_dataset_dir)
    with serve(create_app({"shapes": index, "copy": index})) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs the playwright package: pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as error:  # a broken install: say which binary and how to fix it
            pytest.fail(f"cannot launch {executable}: {error}\n{INSTALL_HINT}", pytrace=False)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, base_url: str) -> Iterator[Any]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_a_missing_chromium_fails_with_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPDISTILL_CHROMIUM", str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(f"{__name__}.DEBIAN_CHROMIUM", str(tmp_path / "chromium"))
    with pytest.raises(pytest.fail.Exception, match=r"not installed: .*sudo apt-get install chromium"):
        chromium_path()


def open_page(page: Any, path: str = "/") -> None:
    page.goto(path)
    page.wait_for_selector("body[data-ready=true]")


def wait_for_cards(page: Any, count: int) -> list[Any]:
    page.wait_for_function(f"document.querySelectorAll('#results .card').length === {count}")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
    return page.query_selector_all("#results .card")


def assert_cards(cards: list[Any]) -> None:
    for card in cards:
        assert card.query_selector(".caption").inner_text().strip()
        assert re.fullmatch(r"-?\d\.\d{3}", card.query_selector(".score").inner_text())
        assert card.query_selector("img").evaluate("img => img.naturalWidth") > 0  # the thumbnail loaded


def test_text_query_fills_the_grid_and_the_url(page: Any, browser: Any, request: pytest.FixtureRequest) -> None:
    open_page(page)
    assert page.locator("#error").is_hidden()
    assert page.locator("#index option").all_inner_texts() == ["shapes (12)", "copy (12)"]
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    cards = wait_for_cards(page, 10)
    assert_cards(cards)
    scores = [float(card.query_selector(".score").inner_text()) for card in cards]
    assert scores == sorted(scores, reverse=True)
    assert "10 results for “a red circle”" in page.inner_text("#status")
    assert page.url.endswith("/?q=a+red+circle&k=10")

    page.select_option("#k", "5")  # changing k re-runs the query and updates the URL
    wait_for_cards(page, 5)
    assert page.url.endswith("?q=a+red+circle&k=5")
    page.go_back()  # the previous URL restores the previous search
    wait_for_cards(page, 10)
    assert page.input_value("#k") == "10"

    if request.config.getoption("--screenshot"):
        take_screenshot(browser, page, request)


def test_a_shared_url_runs_its_query(page: Any) -> None:
    open_page(page, "/?q=a+blue+square&k=3&index=copy&target=text")
    assert_cards(wait_for_cards(page, 3))
    assert page.input_value("#q") == "a blue square"
    assert page.input_value("#index") == "copy" and page.input_value("#target") == "text"
    assert "in copy (captions)" in page.inner_text("#status")


def test_image_upload_drop_and_more_like_this(page: Any, tmp_path: Path) -> None:
    query = tmp_path / "green.png"
    query.write_bytes(png_bytes("green", (64, 64)))
    open_page(page)
    page.set_input_files("#file", str(query))
    assert_cards(wait_for_cards(page, 10))
    assert "results for image green.png" in page.inner_text("#status")
    assert page.locator("#query-image").is_visible()
    assert "q=" not in page.url  # an image cannot be shared by URL; k still is
    page.select_option("#k", "5")
    wait_for_cards(page, 5)

    # drag and drop a file onto the page
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            for (const type of ["dragenter", "dragover", "drop"]) {
                document.querySelector("main").dispatchEvent(
                    new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }
        }""",
        base64.b64encode(png_bytes("yellow", (64, 64))).decode(),
    )
    page.wait_for_function("document.getElementById('status').textContent.includes('dropped.png')")
    assert page.locator("#drop-overlay").is_hidden()
    cards = wait_for_cards(page, 5)

    # clicking a result searches by its thumbnail
    first_id = cards[1].get_attribute("data-id")
    cards[1].query_selector("img").click()
    page.wait_for_function(f"document.getElementById('status').textContent.includes('{first_id}.jpg')")
    cards = wait_for_cards(page, 5)
    assert cards[0].get_attribute("data-id") == first_id  # an image is its own nearest neighbour

    page.click("#clear-image")
    assert page.locator("#query-image").is_hidden()


def test_bad_input_shows_the_servers_message(page: Any, tmp_path: Path) -> None:
    open_page(page)
    page.press("#q", "Enter")  # nothing to search for
    assert "Type a query" in page.inner_text("#error")

    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image")
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.includes('not an image')")
    assert page.locator("#error").is_visible()
    assert page.query_selector_all("#results .card") == []

    open_page(page, "/?q=" + "x" * 1001)  # over-long text from a shared link: the server's reason shows
    page.wait_for_function("!document.getElementById('error').hidden")
    assert "at most 1000 characters" in page.inner_text("#error")

    open_page(page, "/?q=a+red+circle&k=500")
    page.wait_for_function("!document.getElementById('error').hidden")
    assert "less than or equal to 100" in page.inner_text("#error")

    page.select_option("#k", "10")  # a good query clears the message
    wait_for_cards(page, 10)
    assert page.locator("#error").is_hidden()


def take_screenshot(browser: Any, page: Any, request: pytest.FixtureRequest) -> None:
    """docs/screenshot.png: the page after a text query, on the test index or --screenshot-index."""
    index = request.config.getoption("--screenshot-index")
    query = request.config.getoption("--screenshot-query") or "a red circle"
    if index is None:
        shot_page(page, query, 10)
        return
    with serve(create_app({Path(index).resolve().name.replace(" ", "-") or "index": Path(index)})) as url:
        context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 800})
        try:
            shot_page(context.new_page(), query, 20)
        finally:
            context.close()


def shot_page(page: Any, query: str, k: int) -> None:
    from urllib.parse import urlencode

    open_page(page, "/?" + urlencode({"q": query, "k": k}))
    page.wait_for_function("document.getElementById('status').textContent.includes('results for')")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
