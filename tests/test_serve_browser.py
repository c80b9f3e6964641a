"""The page of `difflab serve` in a real headless Chromium (Playwright driving Debian's browser): it lists the models
and shows the inputs that apply, streams the x0 previews of a job and shows its PNGs, reproduces an image from a
reused seed, and shows the server's refusals (over a limit, queue full). Skipped without Chromium or Playwright."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from difflab.serve import build_server, running
from difflab.serve.requests import Limits

TIMEOUT_MS = 60_000  # the machine is small and loaded: wait generously, never sleep
LIMITS = {"max_n": 4, "max_steps": 50, "max_work": 200}
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
REFUSED_RESOURCE = "Failed to load resource"  # Chromium's console line for a 4xx answer (expected on refusals)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (the system's: Playwright cannot download its own here)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright not installed: pip install playwright (difflab's dev extra)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium not found: apt-get install chromium (the CI script .ci/run installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def models(browser, tmp_path_factory, digits_class_run):
    """A folder with one run: a small class-conditional model of the digits (8x8, 10 classes)."""
    folder = tmp_path_factory.mktemp("served_browser") / "models"
    folder.mkdir()
    (folder / "digits").symlink_to(digits_class_run, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def site(models, tmp_path_factory):
    """The server (max_n 4) running on a loopback port for the whole module: (server, base URL)."""
    server = build_server(models, out_dir=tmp_path_factory.mktemp("served_out"), limits=Limits(**LIMITS))
    try:
        with running(server) as url:
            yield server, url
    finally:
        server.queue.stop()


@dataclass
class Tab:
    """A page and what went wrong in it: uncaught exceptions and console errors."""

    page: object
    errors: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def open(self, url: str) -> None:
        """Load the page and wait until it has filled the model picker from the API."""
        self.page.goto(url)
        self.page.wait_for_function("document.querySelectorAll('#model option').length > 0")

    def state(self) -> str:
        return self.page.get_attribute("body", "data-state")

    def results(self) -> int:
        return self.page.locator("img.result-image").count()

    def generate(self, results: int) -> None:
        """Press Generate and wait for the job to end; assert it ended done with `results` images in the gallery."""
        self.page.click("#generate")
        self.page.wait_for_function(
            """(n) => { const s = document.body.dataset.state;
                        return (s === 'done' && document.querySelectorAll('img.result-image').length === n)
                               || s === 'error' || s === 'cancelled'; }""",
            arg=results,
        )
        assert self.state() == "done", self.page.text_content("#error")
        self.assert_images_decoded()

    def refused(self) -> str:
        """Press Generate (from the idle page), wait for the page to show an error; its text."""
        assert self.state() == "idle"
        self.page.click("#generate")
        self.page.wait_for_function("['done', 'error', 'cancelled'].includes(document.body.dataset.state)")
        assert self.state() == "error", f"not refused: the job ended {self.state()}"
        error = self.page.locator("#error")
        assert error.is_visible() and error.get_attribute("hidden") is None
        return error.text_content()

    def assert_images_decoded(self) -> None:
        """The page sets "done" once the gallery's images are decoded (so a client may read them at once)."""
        decoded = self.page.evaluate(
            "[...document.querySelectorAll('img.result-image')].map((img) => img.complete && img.naturalWidth > 0)"
        )
        assert decoded and all(decoded), decoded

    def download(self, index: int) -> tuple[bytes, str]:
        """The bytes behind the download link of the index-th result (0: newest) and its file name."""
        link = self.page.locator("figure.result a.download").nth(index)
        href, name = link.get_attribute("href"), link.get_attribute("download")
        data = self.page.evaluate(
            "async (href) => Array.from(new Uint8Array(await (await fetch(href)).arrayBuffer()))", href
        )
        return bytes(data), name

    def unexpected_console(self) -> list[str]:
        return [line for line in self.console if REFUSED_RESOURCE not in line]


@pytest.fixture
def tab(browser):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page)
    page.on("pageerror", lambda err: tab.errors.append(str(err)))
    page.on("console", lambda msg: tab.console.append(msg.text) if msg.type == "error" else None)
    yield tab
    context.close()


def decode(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def wait_until(condition, what: str, timeout: float = TIMEOUT_MS / 1000):
    """Poll `condition` (from this thread, while the server works in its own) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def fill(page, **values) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


@pytest.mark.slow
def test_the_page_lists_the_model_and_shows_the_class_input(tab, site):
    _, url = site
    tab.open(url)
    page = tab.page
    options = page.locator("#model option")
    assert options.count() == 1
    assert options.first.get_attribute("value") == "digits" and options.first.text_content() == "digits (class)"
    assert page.input_value("#model") == "digits"
    assert page.is_visible("#class") and page.is_hidden("#prompt") and page.is_hidden("#negative")
    assert page.get_attribute("#class", "max") == "9" and page.text_content("#class-range") == "(0 – 9)"
    assert page.text_content("#model-info") == "class · 10 classes · 8×8 · 1 ch"
    assert page.is_enabled("#guidance") and page.input_value("#guidance") == "3"
    assert page.locator("#sampler option").count() > 1 and page.input_value("#sampler") != ""
    assert int(page.input_value("#steps")) >= 1
    assert page.get_attribute("#n", "max") == "4" and page.get_attribute("#steps", "max") == "50"  # from /api/limits
    assert page.is_enabled("#generate") and page.is_disabled("#cancel") and page.is_disabled("#seed-reuse")
    assert page.is_hidden("#error") and page.get_attribute("#error", "hidden") is not None
    assert tab.state() == "idle" and tab.results() == 0
    assert tab.errors == [] and tab.console == []


@pytest.mark.slow
def test_a_generation_streams_its_previews_then_shows_its_images(tab, site):
    server, url = site
    steps = 8
    tab.open(url)
    page = tab.page
    fill(page, **{"class": 3, "seed": 1234, "steps": steps, "n": 2})
    # Record every value the preview's src takes (each mutation's old value is the previous one's new value).
    page.evaluate("""() => {
        const img = document.getElementById('preview');
        window.previewRecords = [];
        new MutationObserver((records) => window.previewRecords.push(...records.map((r) => r.oldValue)))
            .observe(img, { attributes: true, attributeFilter: ['src'], attributeOldValue: true });
    }""")
    # The page subscribes to the job's events after the server has accepted it; the worker waits until it has, so
    # that the page receives every step (a late subscriber only gets the latest progress).
    known = set(server.queue.jobs)
    with server.queue.paused():
        page.click("#generate")
        job = wait_until(lambda: next((j for i, j in list(server.queue.jobs.items()) if i not in known), None), "job")
        wait_until(lambda: job._subscribers, "the page to follow the job's events")
        assert tab.state() == "running" and page.is_disabled("#generate") and page.is_enabled("#cancel")
    page.wait_for_function("document.body.dataset.state !== 'running'")
    assert tab.state() == "done", page.text_content("#error")
    assert tab.results() == 2
    tab.assert_images_decoded()

    assert page.get_attribute("#preview", "data-updates") == str(steps)
    records = page.evaluate("window.previewRecords")
    values = [*records[1:], page.get_attribute("#preview", "src")]  # the new value of each mutation
    previews = [v for v in values if v is not None]
    assert len(previews) == steps  # one src per progress event, then kept
    assert len(set(previews)) > 1  # the prediction changes as the noise falls
    assert all(v.startswith("data:image/png;base64,") for v in previews)
    assert page.is_visible("#preview")
    strip = decode(base64.b64decode(previews[-1].split(",", 1)[1]))
    assert strip.size == (16, 8)  # the two images' x0-hat side by side
    assert page.text_content("#progress") == "done · 2 images"
    bar = page.locator("#progress-bar")
    assert bar.evaluate("(bar) => [bar.value, bar.max]") == [steps, steps]

    images = page.locator("figure.result > img.result-image")
    assert [images.nth(i).get_attribute("data-seed") for i in range(2)] == ["1234", "1235"]
    sizes = images.evaluate_all("(imgs) => imgs.map((img) => [img.naturalWidth, img.naturalHeight])")
    assert sizes == [[8, 8], [8, 8]]
    assert page.locator("figure.result a.download").count() == 2
    data, name = tab.download(0)
    image = decode(data)
    meta = json.loads(image.text["difflab"])
    assert name == "digits-1234.png" and image.format == "PNG" and image.size == (8, 8)
    assert meta["seed"] == 1234 and meta["class"] == "3" and meta["steps"] == steps and meta["server_job"] == job.id
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(job.images[0])))  # the server's file
    assert page.is_enabled("#seed-reuse") and page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert page.is_hidden("#error")
    assert tab.errors == [] and tab.console == []


@pytest.mark.slow
def test_a_reused_seed_draws_the_same_image_and_another_seed_does_not(tab, site):
    _, url = site
    tab.open(url)
    page = tab.page
    fill(page, **{"class": 5, "seed": 777, "steps": 6, "n": 1})
    tab.generate(results=1)
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "777"
    tab.generate(results=2)
    fill(page, seed=778)
    tab.generate(results=3)

    seeds = [page.locator("img.result-image").nth(i).get_attribute("data-seed") for i in range(3)]
    assert seeds == ["778", "777", "777"]  # newest first
    files = [tab.download(i) for i in range(3)]
    other, again, first = (decode(data) for data, _ in files)
    assert json.loads(again.text["difflab"])["server_job"] != json.loads(first.text["difflab"])["server_job"]
    assert np.array_equal(np.asarray(again), np.asarray(first))  # the same seed: the same pixels
    assert not np.array_equal(np.asarray(other), np.asarray(first))  # another seed: another image
    assert tab.errors == [] and tab.console == []


@pytest.mark.slow
def test_the_page_shows_a_request_over_the_limits_then_recovers(tab, site):
    _, url = site
    tab.open(url)
    page = tab.page
    fill(page, **{"class": 1, "seed": 3, "steps": 4, "n": 5})
    message = tab.refused()
    assert "max_n" in message and "got 5" in message  # the server's 422, naming the limit
    assert tab.state() == "error" and tab.results() == 0
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert tab.errors == [] and tab.unexpected_console() == []
    assert any(REFUSED_RESOURCE in line and "422" in line for line in tab.console)

    fill(page, n=1)
    tab.generate(results=1)  # the error is cleared on the next try
    assert page.is_hidden("#error") and page.text_content("#error") == ""
    assert tab.errors == [] and tab.unexpected_console() == []


@pytest.mark.slow
def test_the_page_shows_a_full_queue_with_its_retry_after(tab, models, tmp_path):
    server = build_server(models, out_dir=tmp_path / "out", limits=Limits(**LIMITS, max_queue=1))
    try:
        with running(server) as url:
            tab.open(url)
            fill(tab.page, **{"class": 2, "seed": 1, "steps": 4, "n": 1})
            with server.queue.paused():
                body = json.dumps({"model": "digits", "class_label": 2, "seed": 0, "steps": 4}).encode()
                request = urllib.request.Request(f"{url}/api/generate", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request) as answer:  # the one place in the queue
                    assert answer.status == 202
                message = tab.refused()
            assert "queue is full" in message
            assert "(server busy: retry after" in message and message.endswith(" s)")  # from the Retry-After header
            assert tab.state() == "error" and tab.results() == 0 and tab.page.is_enabled("#generate")
            assert tab.errors == [] and tab.unexpected_console() == []
            assert any(REFUSED_RESOURCE in line and "429" in line for line in tab.console)
            tab.page.context.close()
    finally:
        server.queue.stop()
