"""The oclear-serve page in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

The service runs under uvicorn on a loopback port over an index of the built-in held-out emoji docs (google
images + titles), embedded by the tiny planted-colour model; the browser uploads a built-in twitter emoji PNG
through the page's file input and must show k result cards whose catalogue images really loaded.

Without /usr/bin/chromium or /usr/bin/chromedriver the tests skip, unless OCLEAR_REQUIRE_BROWSER=1 (CI), where
they fail. OCLEAR_SCREENSHOT=<path> also saves the screenshot of the results page there (docs/search_page.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from search_fixtures import built_index, trained_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
WAIT_S = 30
QUERY_CODE = "1F923"  # rolling on the floor laughing (held out); otherwise the first held-out emoji

# One JS probe for the whole page state, so a wait is one round trip and never reads a half-updated DOM.
PAGE_STATE = """
const status = document.getElementById("status");
const preview = document.getElementById("query");
return {
  status: status.textContent, statusClass: status.className, k: document.getElementById("k").value,
  preview: !preview.hidden && preview.complete && preview.naturalWidth > 0,
  items: Array.from(document.querySelectorAll("#results .item"), (card) => {
    const img = card.querySelector("img");
    return {src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0,
            title: card.children[1].textContent, score: card.querySelector(".score").textContent,
            label: card.querySelector(".label").textContent};
  }),
};
"""


@pytest.fixture(scope="module")
def browser_binaries():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        message = f"the browser test needs Debian's chromium and chromedriver ({', '.join(missing)} missing): {INSTALL_HINT}"
        if os.environ.get("OCLEAR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"OCLEAR_REQUIRE_BROWSER=1 but {message}", pytrace=False)
        pytest.skip(message)
    return CHROMIUM, CHROMEDRIVER


def _query_image(emoji_folder: Path) -> Path:
    queries = emoji_folder / "images" / "twitter"
    preferred = queries / f"{QUERY_CODE}.png"
    return preferred if preferred.is_file() else sorted(queries.glob("*.png"))[0]


@pytest.fixture(scope="module")
def served(browser_binaries, tmp_path_factory):
    """(base url, the uploaded emoji PNG, the number of docs) of a live uvicorn server; stopped at the end."""
    import uvicorn

    from oclear_ext.data.emoji import builtin_manifest
    from oclear_ext.search.server import create_app, load_service

    folder = tmp_path_factory.mktemp("search-page")
    run_dir, _ = trained_run(folder)
    emoji_manifest = builtin_manifest(folder / "emoji", split="heldout")
    index_dir = built_index(run_dir, emoji_manifest, folder / "index")
    service = load_service(str(index_dir), max_k=50)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound here: no race for a "free" port
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="oclear-serve-test", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server on {base} did not come up (thread alive: {thread.is_alive()})")
        time.sleep(0.05)
    try:
        yield base, _query_image(folder / "emoji"), len(service.index)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the uvicorn server thread did not stop"


@pytest.fixture(scope="module")
def driver(browser_binaries, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_binaries
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-extensions", "--disable-default-apps", "--window-size=1100,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    # an explicit driver path: selenium manager never tries to download one
    browser = webdriver.Chrome(options=options, service=Service(str(chromedriver)))
    try:
        browser.set_page_load_timeout(WAIT_S)
        browser.set_script_timeout(WAIT_S)
        # a 1100 x 900 viewport exactly (--window-size counts the window, not the page), for the screenshot
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1100, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        yield browser
    finally:
        browser.quit()


def _open_page(driver, base: str):
    driver.get(base + "/")
    assert driver.title == "oclear_ext catalogue search"
    return driver.find_element("id", "file")


def _upload(file_input, path: Path) -> None:
    # chromedriver sets files on an <input type=file> even while it is hidden (inside the drop-zone label)
    file_input.send_keys(str(path.resolve()))


def _wait_for(driver, what: str, done):
    """Polls PAGE_STATE until done(state); a timeout reports the last state seen."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    seen = {}

    def probe(d):
        seen.update(d.execute_script(PAGE_STATE))
        return done(seen)

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(probe)
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {WAIT_S} s; last state: {seen}", pytrace=False)
    return dict(seen)


def _wait_for_results(driver, expected: int, query: Path) -> dict:
    def done(state):
        if state["statusClass"] == "error":  # fail at once, with the page's message
            pytest.fail(f"the page shows an error: {state['status']!r}", pytrace=False)
        items = state["items"]
        return state["status"].startswith(f"{expected} results") and len(items) == expected and \
            all(item["loaded"] for item in items) and state["preview"]

    state = _wait_for(driver, f"{expected} loaded results", done)
    assert state["status"] == f"{expected} results for {query.name}"
    return state


def _check_results(state: dict, api_results: list[dict]) -> None:
    items = state["items"]
    titles = [item["title"] for item in items]
    assert all(title.strip() for title in titles), titles
    scores = [float(item["score"]) for item in items]
    assert scores == sorted(scores, reverse=True), scores
    # the page shows what the API answers for the same file, in the same order
    assert [item["src"] for item in items] == [r["image_url"] for r in api_results]
    assert titles == [r["text"] or r["id"] for r in api_results]
    assert [item["label"] for item in items] == [r["label"] or "" for r in api_results]
    assert scores == pytest.approx([round(r["score"], 3) for r in api_results], abs=1.5e-3)


def _api_search(base: str, path: Path, k: int) -> list[dict]:
    reply = httpx.post(f"{base}/search", params={"k": k}, files={"image": (path.name, path.read_bytes(), "image/png")},
                       timeout=WAIT_S)
    assert reply.status_code == 200, reply.text
    return reply.json()["results"]


def _screenshot(driver, tmp_path: Path) -> Path:
    shot = tmp_path / "search_page.png"
    assert driver.save_screenshot(str(shot)), "the screenshot failed"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("OCLEAR_SCREENSHOT"):
        target = Path(os.environ["OCLEAR_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    return shot


def test_uploading_an_emoji_shows_k_results_with_loaded_images(served, driver, tmp_path):
    from selenium.webdriver.support.ui import Select

    base, query, docs = served
    file_input = _open_page(driver, base)
    k = int(driver.find_element("id", "k").get_attribute("value"))
    assert k == 10  # the page's default
    _upload(file_input, query)
    state = _wait_for_results(driver, min(k, docs), query)
    _check_results(state, _api_search(base, query, k))
    assert all("%2F" in item["src"] for item in state["items"])  # emoji doc ids ("1F600/google") are escaped
    _screenshot(driver, tmp_path)

    # a new k searches the same file again
    Select(driver.find_element("id", "k")).select_by_visible_text("5")
    state = _wait_for_results(driver, min(5, docs), query)
    _check_results(state, _api_search(base, query, 5))


def test_a_non_image_upload_shows_an_error_and_the_service_keeps_answering(served, driver, tmp_path):
    base, query, docs = served
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is a text file, not a PNG\n")
    _upload(_open_page(driver, base), bogus)
    state = _wait_for(driver, "an error", lambda s: s["statusClass"] == "error")
    assert state["status"].startswith("error: not a readable image"), state["status"]
    assert "notes.png" in state["status"] and state["items"] == []
    health = httpx.get(f"{base}/healthz", timeout=WAIT_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    # the same page recovers with a real image
    _upload(driver.find_element("id", "file"), query)
    _wait_for_results(driver, min(10, docs), query)
