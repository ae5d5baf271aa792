"""The web page in a real browser: Debian's Chromium driven by Playwright against the real server
(`clusterlens serve --worker`) on 127.0.0.1, over a small real collection (600 Fashion-MNIST images,
half labelled, embedded at 64 px, with a classifier and an analysis report).

Screenshots of each view go to tests/artifacts/ (ignored by git) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from playwright.sync_api import sync_playwright

from job.datasets import FASHION_MNIST_CLASSES
from tests.conftest import API_KEY, AUTH, png
from tests.full_collection import ENV, SIZE
from tests.servers import ROOT, running_server

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def server(full_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("page") / "data"
    shutil.copytree(full_collection, data_dir)  # the page changes it (labels, uploads)
    with running_server({"CLUSTERLENS_DATA_DIR": str(data_dir), **ENV}, "--worker") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def watch(pg: Any) -> list[str]:
    """Collects JavaScript errors and Content-Security-Policy violations on ``pg``."""
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    return errors


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Any]:
    """A fresh page opened with the write key in the link, as `clusterlens demo` prints it; any
    JavaScript error on it fails the test. Playwright's `wait_for_function` evaluates strings, which
    the page's Content-Security-Policy forbids, so these tests bypass it; the policy itself is tested
    on its own (`test_the_page_runs_under_its_own_content_security_policy`)."""
    with opened(browser, server) as pg:
        yield pg


@contextmanager
def opened(browser: Any, url: str, view: str = "") -> Iterator[Any]:
    """The page at ``url`` (on ``view``), as the `page` fixture opens it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    pg = context.new_page()
    errors = watch(pg)
    pg.goto(f"{url}/#{view + '&' if view else ''}key={API_KEY}")
    assert "key=" not in pg.url  # taken out of the address bar (and history) at once
    yield pg
    context.close()
    assert not errors, errors


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _query_file(tmp_path: Path, fashion_test: tuple[np.ndarray, np.ndarray], cls: str) -> Path:
    images, labels = fashion_test
    i = int(np.flatnonzero(labels == FASHION_MNIST_CLASSES.index(cls))[0])
    path = tmp_path / f"{cls.lower()}.png"
    path.write_bytes(png(images[i]))
    return path


def test_upload_a_query_image_shows_its_class_then_click_to_search_by_a_result(
    page: Any,
    tmp_path: Path,
    fashion_test,  # type: ignore[no-untyped-def]
) -> None:
    page.set_input_files("#file", str(_query_file(tmp_path, fashion_test, "Trouser")))
    page.wait_for_selector("#grid .result")
    labels = page.locator("#grid .result").evaluate_all("cards => cards.map(c => c.dataset.label)")
    top = [lab for lab in labels[:10] if lab]  # every other image is labelled: about five of ten
    assert len(labels) == 20 and len(top) >= 4 and top.count("Trouser") >= 0.8 * len(top), labels
    assert "ms on the server" in page.inner_text("#search-meta")
    assert page.locator("#grid img").first.get_attribute("alt")
    shot(page, "search")

    clicked = page.locator("#grid .result").nth(3)
    clicked_id = clicked.get_attribute("data-id")
    clicked.click()
    page.wait_for_function("document.querySelector('#search-meta').textContent.includes('a stored image')")
    assert page.locator("#grid .result").first.get_attribute("data-id") == clicked_id  # itself, score 1


def test_text_query(page: Any, tmp_path: Path, fashion_test) -> None:  # type: ignore[no-untyped-def]
    page.set_input_files("#file", str(_query_file(tmp_path, fashion_test, "Bag")))
    page.wait_for_selector("#grid .result")
    assert page.locator("#query img").count() == 1  # an image query shows its image ...
    page.fill("#q", "a bag")
    page.press("#q", "Enter")
    page.wait_for_function("document.querySelector('#search-meta').textContent.includes('a bag')")
    assert page.locator("#grid .result").count() > 0
    assert page.locator("#query img").count() == 0  # ... a text query has none: the image query's is gone


def test_label_five_with_the_keyboard(page: Any, server: str) -> None:
    before = httpx.get(server + "/api/labels?limit=0").json()["labelled"]
    page.click("nav a[data-view=label]")
    page.wait_for_selector("#queue .queue-item")
    page.wait_for_function(f"document.querySelector('#labelled-count').textContent === '{before}'")
    ids = page.locator("#queue .queue-item").evaluate_all("cards => cards.slice(0, 5).map(c => c.dataset.id)")
    page.focus("#queue")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")  # arrows move; back to the first
    for _ in range(5):
        page.keyboard.press("2")  # the label set's second class
    assert page.inner_text("#submit-labels") == "Submit 5 labels"
    shot(page, "label")
    page.click("#submit-labels")
    page.wait_for_function(f"document.querySelector('#labelled-count').textContent === '{before + 5}'")
    stored = httpx.get(server + "/api/labels?limit=20").json()
    second = httpx.get(server + "/api/label-set").json()["label_set"]["classes"][1]
    assert stored["labelled"] == before + 5
    assert {(e["id"], e["label"]) for e in stored["recent"]} >= {(i, second) for i in ids}


def test_without_the_key_changes_are_refused_until_it_is_given(browser: Any, server: str) -> None:
    """A reader without the key: labels are refused with the server's message and a hint, nothing is
    stored and nothing given is lost; the Key button stores the key and the same labels go in."""
    context = browser.new_context(bypass_csp=True)
    pg = context.new_page()
    errors = watch(pg)
    pg.goto(f"{server}/#label")
    pg.wait_for_selector("#queue .queue-item")
    before = httpx.get(server + "/api/labels?limit=0").json()["labelled"]
    pg.focus("#queue")
    pg.keyboard.press("1")
    pg.click("#submit-labels")
    pg.wait_for_function("document.querySelector('#label-error').textContent.includes('Key button')")
    assert "write key" in pg.inner_text("#label-error")
    assert httpx.get(server + "/api/labels?limit=0").json()["labelled"] == before
    pg.once("dialog", lambda dialog: dialog.accept(API_KEY))
    pg.click("#key")
    assert pg.inner_text("#key") == "Key ✓"
    pg.click("#submit-labels")
    pg.wait_for_function("document.querySelector('#label-meta').textContent.includes('1 labels saved')")
    assert httpx.get(server + "/api/labels?limit=0").json()["labelled"] == before + 1
    context.close()
    assert not errors, errors


def test_the_map_draws_every_point(page: Any, server: str) -> None:
    page.click("nav a[data-view=map]")
    page.wait_for_function(f"document.querySelector('#map-canvas').dataset.points === '{SIZE}'")
    assert "600 images" in page.inner_text("#map-meta")
    page.select_option("#map-colour", "label")
    assert page.locator("#map-legend span").count() == len(FASHION_MNIST_CLASSES)
    shot(page, "map")
    page.select_option("#map-method", "umap")  # not computed in this report: the API's message is shown
    page.wait_for_function("document.querySelector('#map-error').textContent.length > 0")
    assert "has no file" in page.inner_text("#map-error")


def test_review_lists_and_relabel(page: Any, server: str) -> None:
    page.click("nav a[data-view=review]")
    page.wait_for_selector("#review-anomalies .review-item")
    assert page.locator("#review-anomalies .review-item").count() == 30  # 5% of 600
    shot(page, "review")
    card = page.locator("#review-anomalies .review-item").first
    image_id = card.get_attribute("data-id")
    card.locator("select").select_option(index=0)
    card.locator("button", has_text="Relabel").click()
    page.wait_for_function("document.querySelector('#review-anomalies .review-item .done') !== null")
    first_class = httpx.get(server + "/api/label-set").json()["label_set"]["classes"][0]
    assert (image_id, first_class) in {
        (e["id"], e["label"]) for e in httpx.get(server + "/api/labels").json()["recent"]
    }
    page.locator("#review-anomalies .review-item").first.locator("button", has_text="Dismiss").click()
    assert page.locator("#review-anomalies .review-item").count() == 29


def _plant_a_copy(server: str) -> tuple[str, str]:
    """A gamma-curved copy of a collection image, uploaded and waited for until it is searchable."""
    import io
    import time

    from PIL import Image

    original = httpx.get(server + "/api/label-queue", params={"n": 1}).json()["items"][0]["id"]
    pixels = np.asarray(Image.open(io.BytesIO(httpx.get(f"{server}/api/images/{original}").content)).convert("L"))
    edited = png((255.0 * (pixels / 255.0) ** 1.2).round().astype(np.uint8))
    sent = httpx.post(server + "/api/images", files={"image": ("copy.png", edited, "image/png")}, headers=AUTH)
    assert sent.status_code == 201, sent.text
    copy = sent.json()["id"]
    deadline = time.monotonic() + 90
    while httpx.post(server + "/api/search", json={"id": copy, "k": 1}).status_code != 200:
        assert time.monotonic() < deadline, "the uploaded copy never became searchable"
        time.sleep(0.5)
    return original, copy


def test_duplicates_found_resolved_and_undone(page: Any, server: str) -> None:
    original, copy = _plant_a_copy(server)
    page.click("nav a[data-view=duplicates]")
    page.wait_for_function("document.querySelector('#dup-error').textContent.length > 0")
    assert "no near-duplicate search yet" in page.inner_text("#dup-error")
    page.click("#dup-run")  # starts a dedupe job and follows it until its groups are shown
    page.wait_for_selector("#dup-groups .dup-group", timeout=90_000)
    assert "at pixel match" in page.inner_text("#dup-meta") and page.is_visible("#dup-hist")
    listed = httpx.get(server + "/api/duplicates", params={"limit": 50}).json()
    assert page.locator("#dup-groups .dup-group").count() == len(listed["items"]) > 0
    assert {original, copy} in [{m["id"] for m in g["images"]} for g in listed["items"]]
    shot(page, "duplicates")
    group = page.locator("#dup-groups .dup-group").first
    first = listed["items"][0]
    hidden = [m["id"] for m in first["images"] if m["id"] != first["keeper"]]
    group.locator("button", has_text="Keep the suggested one").click()
    page.wait_for_selector("#dup-groups .dup-group >> nth=0 >> text=kept")
    found = httpx.post(server + "/api/search", json={"id": first["keeper"], "k": 20}, headers=AUTH).json()
    assert not set(hidden) & {r["id"] for r in found["results"]}  # hidden from search
    page.locator("#dup-groups .dup-group").first.locator("button", has_text="Undo").click()
    page.wait_for_selector("#dup-groups .dup-group >> nth=0 >> text=Keep the suggested one")
    again = httpx.get(server + "/api/duplicates", params={"limit": 1}).json()["items"][0]
    assert again["group"] == first["group"] and again["resolved"] is False


def test_upload_then_searchable(page: Any, tmp_path: Path, fashion_test) -> None:  # type: ignore[no-untyped-def]
    page.click("nav a[data-view=upload]")
    page.set_input_files("#upfiles", str(_query_file(tmp_path, fashion_test, "Bag")))
    page.wait_for_function("document.querySelector('#uploads li .done') !== null", timeout=90_000)
    assert page.inner_text("#uploads li .done") == "searchable"
    shot(page, "upload")


def test_api_errors_are_shown(page: Any, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.querySelector('#search-error').textContent.length > 0")
    assert "image" in page.inner_text("#search-error").lower()
    assert page.locator("#grid .result").count() == 0
    shot(page, "error")


def test_the_page_runs_under_its_own_content_security_policy(browser: Any, server: str) -> None:
    """With the policy enforced (no bypass): the page searches, draws the map and shows the labelling
    queue, and the browser reports no violation (waits use selectors only: no evaluated strings)."""
    context = browser.new_context()
    pg = context.new_page()
    errors = watch(pg)
    pg.goto(f"{server}/#key={API_KEY}")
    pg.fill("#q", "trousers")
    pg.press("#q", "Enter")
    pg.wait_for_selector("#grid .result img")
    pg.click("nav a[data-view=map]")
    pg.wait_for_selector(f"#map-canvas[data-points='{SIZE}']")
    pg.click("nav a[data-view=label]")
    pg.wait_for_selector("#queue .queue-item img")
    assert pg.inner_text("#key") == "Key ✓"
    context.close()
    assert not errors, errors


def test_an_empty_collection_says_so(browser: Any, tmp_path: Path) -> None:
    with running_server({"CLUSTERLENS_DATA_DIR": str(tmp_path / "empty")}) as url:
        pg = browser.new_page(bypass_csp=True)
        errors = watch(pg)
        pg.goto(url + "/")
        pg.wait_for_function("document.querySelector('#status').textContent.includes('empty')")
        assert "No images are indexed yet" in pg.inner_text("#grid")
        pg.click("nav a[data-view=map]")
        pg.wait_for_function("document.querySelector('#map-error').textContent.includes('no analysis report yet')")
        pg.click("nav a[data-view=label]")
        pg.wait_for_function("document.querySelector('#label-error').textContent.includes('no index')")
        shot(pg, "empty")
        pg.close()
        assert not errors, errors


@pytest.fixture
def no_report_yet(full_collection: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A server (no worker) over the collection as it is before its first analysis: no report.
    Yields its URL and its environment."""
    data_dir = tmp_path / "data"
    shutil.copytree(full_collection, data_dir)
    shutil.rmtree(data_dir / "reports")
    env = {"CLUSTERLENS_DATA_DIR": str(data_dir), **ENV}
    with running_server(env) as url:
        yield url, env


def test_map_and_review_say_the_first_analysis_is_on_its_way_then_show_it(
    browser: Any, no_report_yet: tuple[str, dict[str, str]]
) -> None:
    """While no report exists and an analyse job is queued, Map and Review say so (no error, no empty
    view); once a worker has run the job, the open view shows the report without a reload."""
    url, env = no_report_yet
    assert httpx.get(url + "/api/reports/latest").json()["error"]["code"] == "no_report"
    job = httpx.post(url + "/api/jobs", json={"kind": "analyse"}, headers=AUTH).json()["job"]
    with opened(browser, url, "map") as pg:
        pg.wait_for_selector("#map-pending:not([hidden])")
        assert "first analysis is queued" in pg.inner_text("#map-pending")
        assert "the map will appear here" in pg.inner_text("#map-pending")
        assert pg.inner_text("#map-error") == "" and pg.locator("#map-canvas").get_attribute("data-points") == "0"
        assert pg.locator("#map-analyse").is_disabled()  # no second analysis behind the first
        shot(pg, "map-analysis-queued")
        pg.click("nav a[data-view=review]")
        pg.wait_for_selector("#review-pending:not([hidden])")
        assert "mislabels and anomalies will appear here" in pg.inner_text("#review-pending")
        assert pg.inner_text("#review-error") == "" and pg.locator(".review-item").count() == 0

        worker = subprocess.run(  # the job lands: the PCA map only, as the collection was built
            [sys.executable, "-m", "tools.cli", "worker", "--until-idle"],
            cwd=ROOT,
            env={**os.environ, "CLUSTERLENS_API_KEY": API_KEY, "CLUSTERLENS_ANALYSIS_MAPS": '["pca"]', **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert worker.returncode == 0 and '"succeeded": 1' in worker.stdout, worker.stdout + worker.stderr
        assert httpx.get(f"{url}/api/jobs/{job['job_id']}").json()["status"] == "succeeded"
        pg.wait_for_selector("#review-anomalies .review-item", timeout=30_000)  # the page polls: no reload
        assert pg.locator("#review-pending").is_hidden() and pg.inner_text("#review-error") == ""
        assert pg.locator("#review-anomalies .review-item").count() == 30
        pg.click("nav a[data-view=map]")
        pg.wait_for_selector(f"#map-canvas[data-points='{SIZE}']")
        assert pg.locator("#map-pending").is_hidden() and pg.locator("#map-analyse").is_enabled()
