"""The operator console (/ui) in a real headless Chromium (Debian's ``chromium``, driven by playwright) against a
real gateway and real model servers: one stack and one browser for the module, a fresh tab (and session
storage) per test. Every wait is playwright's auto-retrying ``expect`` or a bounded poll; the page must never
log a script error.

Set ``BLUEGREEN_CONSOLE_SCREENSHOT`` to a path to keep the screenshot taken during the rollout (docs/console.png
was taken that way)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.integration.expect import expect as expect_http
from tests.procs import ADMIN_TOKEN, admin_headers, routing, start_gateway, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
VIEWER_TOKEN = "viewer-token-0123456789abc"
CHROMIUM = "/usr/bin/chromium"
ROW = [float(i % 17) for i in range(64)]


@dataclass
class Stack:
    admin: str
    data: str
    stop_load: threading.Event = field(default_factory=threading.Event, repr=False)
    running: threading.Event = field(default_factory=threading.Event, repr=False)
    """Cleared to hold the traffic (the window then changes only when a slot ages out)."""
    sent: list[int] = field(default_factory=list, repr=False)

    def get(self, path: str) -> Any:
        return expect_http(httpx.get(f"{self.admin}{path}", headers=admin_headers()), 200, path).json()

    def model(self) -> dict[str, Any]:
        return next(m for m in self.get("/admin/v1/models")["models"] if m["name"] == "digits")  # type: ignore[no-any-return]

    def load(self) -> None:
        """Paced traffic (about 60 requests/s) for the charts and the rollout; failures are retried by the
        gateway on the other color, so every answer should be 200."""
        with httpx.Client(base_url=self.data, timeout=10) as c:
            i = 0
            while not self.stop_load.wait(1 / 60):
                if not self.running.wait(1.0):
                    continue
                doc = {"id": f"c{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
                try:
                    self.sent.append(c.post("/v2/models/digits/infer", json=doc,
                                            headers={"cache-control": "no-cache"}).status_code)
                except httpx.HTTPError:
                    self.sent.append(-1)
                i += 1


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    tokens = tmp / "tokens.yaml"
    tokens.write_text(json.dumps({"vic": {"token": VIEWER_TOKEN, "roles": ["viewer"]}}))
    procs = []
    try:
        # Both model servers start at once (each waits for its ONNX session): a few seconds off the module.
        with ThreadPoolExecutor(2) as pool:
            starting = [pool.submit(start_model_server, tmp, ["digits:1"]),
                        pool.submit(start_model_server, tmp, ["digits:2"], extra=["--fault-error-rate", "0.5"])]
            started = [f.result() for f in starting]
        procs += [proc for proc, _ in started]
        (_, blue_url), (_, green_url) = started
        gw, data, admin = start_gateway(tmp, routing([blue_url], [green_url]),
                                        {"BLUEGREEN_ADMIN_TOKENS_FILE": str(tokens),
                                         "BLUEGREEN_HISTORY_INTERVAL_S": "0.5"})
        procs.append(gw)
        s = Stack(admin, data)
        s.running.set()
        loader = threading.Thread(target=s.load, daemon=True)
        loader.start()
        yield s
        s.stop_load.set()
        loader.join(10)
        assert s.sent and set(s.sent) == {200}, f"answers other than 200: {sorted(set(s.sent))}"
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:  # never a skip: CI installs it (.ci/run)
        pytest.fail("chromium is not installed (Debian package chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh tab at 1280 px; fails the test if the page logged an error (a 4xx the test provoked aside)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error"
           and "status of 40" not in msg.text else None)
    tab.set_default_timeout(15_000)
    yield tab
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def sign_in(page: Page, stack: Stack, token: str = ADMIN_TOKEN) -> None:
    page.goto(f"{stack.admin}/ui")
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def card(page: Page) -> Any:
    return page.locator("section.model[data-model=digits]")


def test_a_wrong_token_is_refused_with_a_clear_message(page: Page, stack: Stack) -> None:
    sign_in(page, stack, "not-a-token-of-this-gateway")
    message = page.get_by_test_id("sign-in-error")
    expect(message).to_contain_text("The gateway refused this token: missing or invalid bearer token")
    expect(card(page)).to_have_count(0)
    assert page.evaluate("sessionStorage.length") == 0  # a refused token is not kept


def test_the_page_shows_the_weights_and_phase_the_api_reports(page: Page, stack: Stack) -> None:
    sign_in(page, stack)
    expect(page.get_by_test_id("who")).to_have_text("admin (admin)")
    model = stack.model()
    c = card(page)
    for color in ("blue", "green"):
        expect(c.locator(f".weights .bar.{color}")).to_have_attribute("data-weight", str(model["weights"][color]))
    expect(c.get_by_test_id("phase")).to_have_text(model["canary"]["phase"].replace("_", " "))
    expect(c.locator("[data-color=blue] td").first).to_have_text(model["colors"]["blue"]["version"])
    for color in ("blue", "green"):  # a breaker per backend, as the API reports it
        breaker = model["colors"][color]["backends"][0]["breaker"]
        expect(c.locator(f"[data-color={color}]").get_by_test_id("breaker")).to_have_text(breaker)


def test_weights_set_from_the_page_change_the_state_and_the_audit(page: Page, stack: Stack) -> None:
    sign_in(page, stack)
    c = card(page)
    try:
        c.get_by_test_id("green-weight").fill("10")
        c.get_by_test_id("weights-reason").fill("console test: 10% to green")
        c.locator("[data-control=set-weights]").click()
        entry = c.get_by_test_id("audit-entry")
        expect(entry).to_contain_text("set_weights digits")
        expect(entry).to_contain_text("console test: 10% to green")
        assert stack.get("/admin/v1/models/digits/split") == {"blue": 90, "green": 10}
        newest = stack.get("/admin/v1/audit?limit=1")["entries"][0]
        assert (newest["action"], newest["who"], newest["reason"]) == ("set_weights", "admin",
                                                                        "console test: 10% to green")
        expect(c.locator(".weights .bar.green")).to_have_attribute("data-weight", "10")
        expect(page.locator("#audit-list li").first).to_contain_text("set_weights")
    finally:
        expect_http(httpx.put(f"{stack.admin}/admin/v1/models/digits/split", json={"blue": 100, "green": 0},
                              headers=admin_headers()))


def test_a_write_refused_during_a_rollout_is_explained_and_an_abort_is_audited(page: Page, stack: Stack) -> None:
    # A rollout whose first analysis is an hour away: it stays at its first stage for the whole test.
    expect_http(httpx.post(f"{stack.admin}/admin/v1/models/digits/canary/start", headers=admin_headers(),
                           json={"policy": {"stages": [{"weight": 5, "hold_s": 3600}], "interval_s": 3600}}))
    sign_in(page, stack)
    c = card(page)
    expect(c.get_by_test_id("phase")).to_have_text("progressing")
    expect(c.get_by_test_id("stage")).to_have_text("1 of 1")
    c.get_by_test_id("green-weight").fill("50")
    c.get_by_test_id("weights-reason").fill("by hand during a rollout")
    c.locator("[data-control=set-weights]").click()
    # The API's own words, then the page's explanation.
    expect(c.get_by_test_id("api-error")).to_contain_text("a canary rollout of 'digits' is progressing")
    expect(c.get_by_test_id("result")).to_contain_text("Refused (409)")
    expect(c.get_by_test_id("result")).to_contain_text("While a rollout runs it owns the weights")
    c.locator("[data-control=abort]").click()
    c.get_by_test_id("reason").fill("console test: abort")
    c.locator("[data-control=confirm]").click()
    expect(c.get_by_test_id("audit-entry")).to_contain_text("canary_abort digits")
    expect(c.get_by_test_id("phase")).to_have_text("rolled back")
    assert stack.model()["canary"]["phase"] == "rolled_back"


def test_a_faulty_green_is_rolled_back_on_the_page_without_a_reload(page: Page, stack: Stack,
                                                                    tmp_path: Path) -> None:
    sign_in(page, stack)
    c = card(page)
    page.evaluate("window.__notReloaded = true")
    c.locator("[data-control=start]").click()
    preview = c.get_by_test_id("policy-preview")
    expect(preview).to_contain_text("stage 1:")  # the routing file's policy, shown before confirming
    policy = {"stages": [{"weight": 50, "hold_s": 60}], "interval_s": 3, "min_requests": 20}
    c.get_by_test_id("policy").fill(json.dumps(policy))
    expect(preview).to_contain_text("stage 1: 50% for 60 s")
    c.get_by_test_id("reason").fill("console test: faulty green")
    c.locator("[data-control=confirm]").click()
    expect(c.get_by_test_id("audit-entry")).to_contain_text("canary_start digits")
    expect(c.get_by_test_id("phase")).to_have_text("progressing")
    expect(c.locator(".weights .bar.green")).to_have_attribute("data-weight", "50")
    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("BLUEGREEN_CONSOLE_SCREENSHOT"):
        shutil.copy(shot, os.environ["BLUEGREEN_CONSOLE_SCREENSHOT"])

    expect(c.get_by_test_id("phase")).to_have_text("rolled back", timeout=20_000)
    decision = stack.model()["canary"]["last_decision"]
    assert decision["result"] == "rollback"
    expect(c.get_by_test_id("decision-result")).to_have_text("rollback")
    expect(c.get_by_test_id("decision-reason")).to_have_text(decision["reason"])
    c.locator(".decision summary").click()
    evidence = c.get_by_test_id("evidence")
    for row in ("requests", "errors"):
        expect(evidence.locator(f"[data-row={row}] td").first).to_have_text(
            str(decision["evidence"]["candidate"][row]))
    expect(c.locator(".weights .bar.green")).to_have_attribute("data-weight", "0")
    # The timeline, filtered to the controller's rollbacks, opens the decision to its evidence.
    page.get_by_label("Actor").select_option("controller")
    page.get_by_label("Action").select_option("canary_rollback")
    expect(page.locator("#audit-list li:not([data-action=canary_rollback])")).to_have_count(0)
    rollback = page.locator("#audit-list li[data-action=canary_rollback]").first
    expect(rollback).to_contain_text("by controller")
    rollback.locator("summary").click()
    entry = next(e for e in stack.get("/admin/v1/audit")["entries"] if e["action"] == "canary_rollback")
    expect(rollback.locator("[data-row=errors] td").first).to_have_text(str(entry["evidence"]["candidate"]["errors"]))
    assert page.evaluate("window.__notReloaded") is True


def test_a_viewer_sees_no_controls_and_a_forged_write_gets_403(page: Page, stack: Stack) -> None:
    sign_in(page, stack, VIEWER_TOKEN)
    c = card(page)
    expect(c.get_by_test_id("controls")).to_contain_text("Read-only: vic holds viewer.")
    expect(page.locator("[data-control]")).to_have_count(0)
    before = stack.model()["revision"]
    status, body = page.evaluate("""async (token) => {
        const r = await fetch('/admin/v1/models/digits/split', {method: 'PUT', body: '{"blue": 0, "green": 100}',
            headers: {authorization: 'Bearer ' + token, 'if-match': '*', 'content-type': 'application/json'}});
        return [r.status, await r.json()];
    }""", VIEWER_TOKEN)
    assert status == 403 and "'operator' role" in body["error"], body
    assert stack.model()["revision"] == before


def test_the_charts_agree_with_stats(page: Page, stack: Stack) -> None:
    sign_in(page, stack)
    c = card(page)
    p95 = c.locator('path[data-series="blue p95"]')
    wait_until(lambda: int(p95.get_attribute("data-points") or 0) >= 4, 15, 0.2, "four history points on the chart")
    history = stack.get("/admin/v1/models/digits/history")
    expect(c.locator("line[data-threshold]").first).to_have_attribute(
        "data-threshold", f"{history['thresholds']['max_p95_ms']:g}")

    def agree() -> bool:
        drawn = float(p95.get_attribute("data-last") or "nan")  # the newest history point the chart drew
        live = float(c.locator("[data-color=blue]").get_by_test_id("p95").inner_text().removesuffix(" ms"))
        stats = stack.get("/admin/v1/models/digits/stats")["colors"]["blue"]["p95_ms"]
        # The window's buckets are 2% wide: two readings of the same window are within that of each other (the
        # table prints 3 significant digits).
        return stats is not None and abs(drawn - stats) <= 0.02 * stats and abs(live - stats) <= 0.02 * stats

    stack.running.clear()  # "at the same moment": hold the traffic, so the page's poll and /stats see one window
    try:
        wait_until(agree, 10, 0.3, "the chart's and the table's p95 and /stats within the window's 2% buckets")
    finally:
        stack.running.set()


def test_a_phone_wide_dark_page_is_usable_by_keyboard(browser: Browser, stack: Stack) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    try:
        tab = context.new_page()
        tab.goto(f"{stack.admin}/ui")
        tab.keyboard.press("Tab")  # the first focusable control is the token field
        assert tab.evaluate("document.activeElement.id") == "token"
        tab.keyboard.type(ADMIN_TOKEN)
        tab.keyboard.press("Enter")
        expect(tab.locator("section.model[data-model=digits]")).to_be_visible()
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        background = tab.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(17, 20, 24)", background  # the dark scheme
    finally:
        context.close()
