"""The web client in a real browser: token from the URL, a batch filling in live, cancel, errors, phone layout,
conditional polling."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Response,
    Route,
    ViewportSize,
    expect,
    sync_playwright,
)

from app.harness import Stack
from tests.utils import ROOT, auth, new_user, require_tool, token, wait_status, wait_until

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 375, "height": 740}
WAIT_MS = 30_000

IMAGES_LOADED = """([queueId, n]) => {
  const imgs = [...document.querySelectorAll(`[data-queue-id="${queueId}"] .tile img.tile-image`)];
  return imgs.length === n && imgs.every((img) => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_tool(CHROMIUM.exists(), f"BROWSER TESTS SKIPPED: no Chromium at {CHROMIUM}. Install it with "
                 "scripts/install-test-tools.sh (as root) to test the web client.")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


class PageErrors:
    """Uncaught exceptions in the page's scripts, and anything its Content-Security-Policy refused."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)


def open_client(browser: Browser, stack: Stack, user: str, viewport: ViewportSize) -> tuple[Page, PageErrors]:
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(WAIT_MS)
    errors = PageErrors(page)
    page.goto(f"{stack.base_url}/#token={token(user)}")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    return page, errors


def card(page: Page, queue_id: str) -> Locator:
    return page.locator(f'[data-queue-id="{queue_id}"]')


def queue_ids(client: httpx.Client, headers: dict[str, str]) -> list[str]:
    ids = [q["queue_id"] for q in client.get("/active-queues", headers=headers).json()["queues"]]
    ids += [q["queue_id"] for q in client.get("/history", headers=headers).json()["queues"]]
    return list(dict.fromkeys(ids))  # one that finishes between the two calls is in both


def test_batch_from_the_form_fills_in_live_and_opens_large(browser: Browser, stack: Stack,
                                                           client: httpx.Client) -> None:
    user = new_user()
    headers = auth(user)
    page, errors = open_client(browser, stack, user, DESKTOP)
    assert "#token" not in page.url  # taken from the fragment, then removed from the address bar
    assert page.evaluate("localStorage.getItem('imagequeue.token')")
    expect(page.locator("#token-toggle")).to_have_text(user)

    page.fill("#prompts", "a red fox in the snow\na blue owl at night\n\na green frog on a leaf")
    page.fill("input[name=count]", "2")
    page.fill("input[name=width]", "256")
    page.fill("input[name=height]", "256")
    page.fill("input[name=seed]", "7")
    page.fill("input[name=name]", "browser batch")
    expect(page.locator("#estimate")).to_have_text("3 prompts \N{MULTIPLICATION SIGN} 2 = 6 images")
    page.dblclick("#submit")  # one queue, however many clicks

    ids = wait_until(lambda: queue_ids(client, headers), 10, 0.1, what="the queue to be created")
    assert len(ids) == 1, ids
    qid = ids[0]
    batch = card(page, qid)
    expect(batch).to_have_attribute("data-finished", "true")
    expect(batch).to_have_attribute("data-status", "completed")
    expect(batch.locator(".progress-label")).to_have_text("100%")
    expect(batch.locator(".counts")).to_have_text("6/6 done")
    expect(batch.locator(".card-title")).to_have_text("browser batch")
    batch.scroll_into_view_if_needed()
    page.wait_for_function(IMAGES_LOADED, arg=[qid, 6])
    assert queue_ids(client, headers) == [qid]
    # The grid loads the small WebP thumbnails; the lightbox (below) the full image.
    sources = batch.locator(".tile img.tile-image").evaluate_all("imgs => imgs.map((img) => img.getAttribute('src'))")
    assert len(sources) == 6 and all("thumb=1" in src for src in sources), sources

    batch.locator(".tile").nth(1).click()
    lightbox = page.locator("#lightbox")
    expect(lightbox).to_be_visible()
    expect(page.locator("#lightbox-caption")).to_contain_text("#1 · seed 8 — a red fox in the snow")
    page.wait_for_function("() => document.getElementById('lightbox-img').naturalWidth === 256")
    page.screenshot(path=SCREENSHOTS / "desktop-lightbox.png")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#lightbox-caption")).to_contain_text("#2 · seed 9 — a blue owl at night")
    page.keyboard.press("Escape")
    expect(lightbox).to_be_hidden()

    # A slow batch made elsewhere shows up through the live stream alone, moves, and is cancelled here.
    slow = client.post("/create-queue", headers=headers, json={
        "prompts": ["a slow lighthouse"], "count": 80, "width": 128, "height": 128, "name": "slow batch",
        "params": {"latency_ms": 1500},
    })
    assert slow.status_code == 201, slow.text
    slow_id = slow.json()["queue_id"]
    slow_card = card(page, slow_id)
    expect(slow_card).to_have_attribute("data-finished", "false")
    expect(slow_card.locator(".tile[data-status=running]").first).to_be_visible()
    page.wait_for_function(
        "(id) => Number(document.querySelector(`[data-queue-id=\"${id}\"]`).dataset.progress) > 0", arg=slow_id
    )
    page.screenshot(path=SCREENSHOTS / "desktop-running.png", full_page=True)
    slow_card.locator("button.cancel").click()
    expect(slow_card).to_have_attribute("data-status", "cancelled")
    expect(slow_card).to_have_attribute("data-finished", "true")
    expect(slow_card.locator(".status")).to_have_text("cancelled")
    expect(slow_card.locator("button.retry")).to_be_visible()
    expect(page.locator("#history > .card").first).to_have_attribute("data-queue-id", slow_id)
    final = wait_status(client, headers, slow_id, {"cancelled"})
    assert 0 < final["succeeded"] < 80 and final["cancelled"] > 0
    expect(slow_card.locator(".counts")).to_contain_text(f"{final['cancelled']} cancelled")
    page.screenshot(path=SCREENSHOTS / "desktop.png", full_page=True)
    assert errors.errors == []
    page.close()


PREVIEW_SHOWN = """(queueId) => {
  const tile = document.querySelector(`[data-queue-id="${queueId}"] .tile[data-index="0"]`);
  const img = tile && tile.querySelector("img.tile-preview");
  return img && img.complete && img.naturalWidth > 0 ? tile.dataset.status : null;
}"""
TILE_PROGRESS = """(queueId) => {
  const tile = document.querySelector(`[data-queue-id="${queueId}"] .tile[data-index="0"]`);
  return tile && tile.dataset.progress !== undefined ? Number(tile.dataset.progress) : -1;
}"""


def test_running_tiles_show_step_progress_and_the_live_preview(browser: Browser, stack: Stack,
                                                               client: httpx.Client) -> None:
    """A running image's tile shows its steps moving and its provider's preview before the final image."""
    user = new_user()
    headers = auth(user)
    page, errors = open_client(browser, stack, user, DESKTOP)
    r = client.post("/create-queue", headers=headers, json={
        "prompts": ["a lighthouse at dusk"], "count": 2, "width": 256, "height": 256, "name": "stepping",
        "params": {"latency_ms": 5000, "steps": 10}})
    assert r.status_code == 201, r.text
    qid = r.json()["queue_id"]
    batch = card(page, qid)
    expect(batch.locator(".tile[data-index='0'][data-progress]")).to_be_visible()
    first = page.evaluate(TILE_PROGRESS, qid)
    # The preview loads while the image still runs, and the bar moves on.
    status_when_shown = page.wait_for_function(PREVIEW_SHOWN, arg=qid).json_value()
    assert status_when_shown == "running"
    page.wait_for_function(f"(id) => ({TILE_PROGRESS})(id) > {first}", arg=qid)
    expect(batch.locator(".tile[data-index='0'] .tile-step")).to_have_text(re.compile(r"^\d+/10$"))
    expect(batch.locator(".extra")).to_contain_text("left")  # the step-based ETA
    batch.scroll_into_view_if_needed()
    batch.screenshot(path=SCREENSHOTS / "desktop-progress.png")
    # Then the final image takes the preview's place.
    expect(batch).to_have_attribute("data-finished", "true")
    page.wait_for_function(IMAGES_LOADED, arg=[qid, 2])
    expect(batch.locator(".tile-progress")).to_have_count(0)
    expect(batch.locator("img.tile-preview")).to_have_count(0)
    batch.screenshot(path=SCREENSHOTS / "desktop-progress-done.png")
    assert errors.errors == []
    page.close()


def test_bad_input_shows_the_servers_validation_errors(browser: Browser, stack: Stack) -> None:
    page, errors = open_client(browser, stack, new_user(), DESKTOP)
    page.fill("#prompts", "a castle")
    page.fill("input[name=width]", "5000")
    page.click("#submit")
    form_errors = page.locator("#form-errors")
    expect(form_errors).to_be_visible()
    expect(form_errors).to_contain_text("width: width must be at most")
    expect(page.locator("input[name=width]")).to_have_attribute("aria-invalid", "true")

    page.check("input[name=mode][value=template]")
    page.fill("#prompt", "a {colour} {animal}")
    page.fill("#variables", "colour = red, blue")
    page.fill("input[name=width]", "256")
    page.click("#submit")
    expect(form_errors).to_contain_text("animal")
    assert page.locator("#active .card").count() == 0
    page.screenshot(path=SCREENSHOTS / "desktop-422.png")
    assert errors.errors == []
    page.close()


def test_rate_limit_outage_and_network_errors_are_explained(browser: Browser, stack: Stack) -> None:
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(WAIT_MS)
    errors = PageErrors(page)
    outage_until = time.monotonic() + 2

    def store_down_for_a_while(route: Route) -> None:
        if time.monotonic() < outage_until:
            route.fulfill(status=503, headers={"Retry-After": "1"}, content_type="application/json",
                          body=json.dumps({"detail": "The queue store (Redis) is unavailable."}))
        else:
            route.continue_()

    page.route(re.compile(r"/(history|active-queues|stream-token|models)\b"), store_down_for_a_while)
    page.goto(f"{stack.base_url}/#token={token(new_user())}")
    store = page.locator('.message[data-key="store"]')
    expect(store).to_contain_text("The queue store is unavailable; retrying")
    expect(page.locator("#live")).to_have_attribute("data-state", "connecting")
    expect(store).to_have_count(0)  # gone once a retry got through
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(page.locator("#history-empty")).to_be_visible()

    page.route("**/create-queue", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "30"}, content_type="application/json",
        body=json.dumps({"detail": "you already have 2 active queues, the most allowed; wait for one to finish"})))
    page.fill("#prompts", "a harbour")
    page.click("#submit")
    action = page.locator('.message[data-key="action"]')
    expect(action).to_contain_text("too many requests. you already have 2 active queues")
    expect(action).to_contain_text("Retry-After: 30 s")
    expect(page.locator("#submit")).to_be_disabled()
    expect(page.locator("#submit")).to_contain_text("Wait")
    page.screenshot(path=SCREENSHOTS / "desktop-429.png")

    page.unroute("**/create-queue")
    page.route("**/create-queue", lambda route: route.abort("internetdisconnected"))
    page.evaluate("document.getElementById('submit').disabled = false")
    page.click("#submit")
    expect(action).to_contain_text("cannot reach the server")
    assert errors.errors == []
    page.close()


def test_expired_token_asks_for_a_new_one(browser: Browser, stack: Stack) -> None:
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{stack.base_url}/#token={token(new_user(), ttl=-60)}")
    message = page.locator('.message[data-key="auth"]')
    expect(message).to_contain_text("invalid or has expired")
    expect(page.locator("#token-panel")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-state", "off")

    user = new_user()
    page.fill("#token-input", token(user))
    page.click("#token-form button[type=submit]")
    expect(page.locator("#live")).to_have_attribute("data-state", "live")
    expect(message).to_have_count(0)
    expect(page.locator("#token-toggle")).to_have_text(user)
    page.close()


def test_history_retry_and_delete(browser: Browser, stack: Stack, client: httpx.Client) -> None:
    user = new_user()
    headers = auth(user)
    failed = client.post("/create-queue", headers=headers, json={
        "prompts": ["never works"], "count": 2, "width": 64, "height": 64, "params": {"fail": "bad prompt"},
    }).json()["queue_id"]
    wait_status(client, headers, failed, {"failed"})
    page, errors = open_client(browser, stack, user, DESKTOP)
    failed_card = card(page, failed)
    expect(failed_card).to_have_attribute("data-status", "failed")
    expect(failed_card.locator(".tile[data-status=failed]")).to_have_count(2)
    expect(failed_card.locator(".tile-error").first).to_have_text("bad prompt")
    failed_card.screenshot(path=SCREENSHOTS / "desktop-failed-card.png")

    failed_card.locator("button.retry").click()
    wait_until(lambda: client.get(f"/queue-status/{failed}", headers=headers).json()["attempt"] == 2, 10,
               what="the retry")
    expect(failed_card).to_have_attribute("data-status", "failed")
    expect(failed_card).to_have_attribute("data-finished", "true")

    failed_card.locator("button.delete").click()
    failed_card.locator("button.delete").click()  # the second click confirms
    expect(failed_card).to_have_count(0)
    assert client.get(f"/queue-status/{failed}", headers=headers).status_code == 404
    assert errors.errors == []
    page.close()


def test_phone_layout_fits_375_pixels(browser: Browser, stack: Stack, client: httpx.Client) -> None:
    user = new_user()
    headers = auth(user)
    done = client.post("/create-queue", headers=headers, json={
        "prompt": "a {colour} kite over the {place}, with a rather long description that has to wrap",
        "variables": {"colour": ["red", "yellow"], "place": ["sea", "hills"]}, "count": 4, "width": 192,
        "height": 192, "name": "kites on a phone-sized screen", "tags": ["phone"],
    }).json()["queue_id"]
    wait_status(client, headers, done, {"completed"})
    page, errors = open_client(browser, stack, user, PHONE)
    history_card = card(page, done)
    expect(history_card).to_have_attribute("data-status", "completed")
    expect(history_card.locator(".tile")).to_have_count(12)  # history shows a first page of thumbnails
    expect(history_card.locator("button.show-all")).to_have_text("Show all 16")
    history_card.scroll_into_view_if_needed()
    page.wait_for_function(IMAGES_LOADED, arg=[done, 12])
    history_sources = history_card.locator(".tile img.tile-image").evaluate_all("imgs => imgs.map((img) => img.src)")
    assert all("thumb=1" in src for src in history_sources), history_sources
    page.fill("#prompts", "a very long prompt " * 20)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] == PHONE["width"], f"horizontal scroll at 375 px: {json.dumps(widths)}"
    page.evaluate("window.scrollTo(0, 0)")
    time.sleep(0.2)  # let the smooth scroll settle before the picture
    page.screenshot(path=SCREENSHOTS / "phone.png", full_page=True)

    history_card.locator("button.show-all").click()
    expect(history_card.locator(".tile")).to_have_count(16)
    history_card.locator(".tile").first.click()
    page.wait_for_function("() => document.getElementById('lightbox-img').naturalWidth === 192")
    page.screenshot(path=SCREENSHOTS / "phone-lightbox.png")
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    assert errors.errors == []
    page.close()


class EtagServer:
    """Answers the polled GETs as a server with ETags would (a hash of the body), whatever the real one sends."""

    POLLED = re.compile(r"/(queue-status/[^/?]+|active-queues|history)(\?|$)")

    def __init__(self, page: Page) -> None:
        self.answers: list[tuple[str, str | None, int]] = []  # (path, If-None-Match, status)
        page.route(self.POLLED, self._answer)

    def _answer(self, route: Route) -> None:
        asked = route.request.headers.get("if-none-match")
        forward = {k: v for k, v in route.request.headers.items() if k != "if-none-match"}
        response = route.fetch(headers=forward)  # in full, to have a body to hash
        etag = f'"{hashlib.sha256(response.body()).hexdigest()[:20]}"'
        status = 304 if response.status == 200 and asked == etag else response.status
        self.answers.append((urlsplit(route.request.url).path, asked, status))
        if status == 304:
            route.fulfill(status=304, headers={"ETag": etag})
        else:
            route.fulfill(response=response, headers={**response.headers, "ETag": etag})

    def not_modified(self, path: str) -> int:
        return sum(1 for answered, asked, status in self.answers if answered == path and asked and status == 304)


def not_modified(path: str) -> Callable[[Response], bool]:
    return lambda response: urlsplit(response.url).path == path and response.status == 304


def test_polls_ask_if_changed_and_a_304_keeps_the_last_answer(browser: Browser, stack: Stack,
                                                             client: httpx.Client) -> None:
    user = new_user()
    headers = auth(user)
    jwt = token(user)
    done = client.post("/create-queue", headers=headers, json={
        "prompts": ["a paper kite"], "count": 16, "width": 64, "height": 64, "name": "kites",
    }).json()["queue_id"]
    wait_status(client, headers, done, {"completed"})
    page = browser.new_page(viewport=DESKTOP)
    page.set_default_timeout(WAIT_MS)
    errors = PageErrors(page)
    server = EtagServer(page)
    page.goto(f"{stack.base_url}/#token={jwt}")
    history_card = card(page, done)
    expect(history_card.locator(".tile")).to_have_count(12)
    status_path = f"/queue-status/{done}"

    show_all = history_card.locator("button.show-all")
    show_all.click()  # all 16 from the history's answer, and the queue's status asked for in full
    expect(history_card.locator(".tile")).to_have_count(16)
    show_all.click()
    expect(history_card.locator(".tile")).to_have_count(12)
    with page.expect_response(not_modified(status_path)):
        show_all.click()  # asked again with the ETag: 304, and the card stays as it was
    assert next(asked for path, asked, _ in server.answers if path == status_path) is None
    assert server.not_modified(status_path) == 1
    expect(history_card.locator(".tile")).to_have_count(16)
    expect(history_card.locator(".counts")).to_have_text("16/16 done")
    page.wait_for_function(IMAGES_LOADED, arg=[done, 16])

    # The same token again starts the view over: both lists come back as 304s, from the last answers.
    page.click("#token-toggle")
    page.fill("#token-input", jwt)
    with page.expect_response(not_modified("/active-queues")), page.expect_response(not_modified("/history")):
        page.click("#token-form button[type=submit]")
    expect(history_card).to_have_attribute("data-status", "completed")
    expect(history_card.locator(".tile")).to_have_count(12)
    expect(page.locator("#history-count")).to_have_text("1")
    assert errors.errors == []
    page.close()
