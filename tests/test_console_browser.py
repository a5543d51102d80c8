"""The console in a real browser: Debian's headless chromium driven by Playwright through overview ->
version -> compare -> rollback with the token and back, and the XSS case. Screenshots of each page go to
the test's tmp_path. Skips (saying why) when chromium is not installed: `make test` installs it as root."""

from __future__ import annotations

import shutil

import httpx
import pytest

from rag_model.server import create_app
from storage.store import IndexStore
from tests.fixtures.console_store import XSS_TEXT, XSS_TITLE, build_console_store
from tests.test_server import ServerThread, ready_version, wait_for

TOKEN = "browser-token"
CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make browser` installs it "
                                                "as root)"),
]


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_question_encoder, tiny_dpr):
    tmp = tmp_path_factory.mktemp("browser")
    built = build_console_store(IndexStore(str(tmp / "store")), tiny_question_encoder, tiny_dpr.ctx_dir,
                                tmp / "days")
    app = create_app(built.store, admin_token=TOKEN, poll_seconds=0.1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        wait_for(lambda: ready_version(c) == built.delta, timeout=60)
        yield built, server.url


@pytest.fixture
def page(console):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        dialogs: list[str] = []

        def accept(dialog) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        tab.on("dialog", accept)
        tab.errors, tab.dialogs = errors, dialogs
        try:
            yield tab
        finally:
            browser.close()


def test_overview_version_compare_rollback_and_back(console, page, tmp_path):
    from playwright.sync_api import expect

    built, url = console
    # Overview: what is serving, how fresh, the charts.
    page.goto(f"{url}/ui")
    body = page.inner_text("body")
    assert f"serving: {built.delta}" in body and "mode delta" in body and "20240102" in body
    for chart in page.locator("img.chart").all():
        assert chart.evaluate("img => img.complete && img.naturalWidth > 0"), "a chart did not load"
    assert page.locator("img.chart").count() == 2
    page.screenshot(path=str(tmp_path / "1-overview.png"), full_page=True)

    # Version: the delta's changes, highlighted, each linked to its revision.
    page.click(f"a[href='/ui/versions/{built.delta}']")
    page.wait_for_url(f"**/ui/versions/{built.delta}")
    assert page.locator("tr.added").filter(has_text="Louvre").count() == 1
    moved = page.locator("tr.changed").filter(has_text="Eiffel Tower (Paris)")
    assert moved.count() == 1 and "moved" in moved.inner_text()
    assert "oldid=7001" in page.locator("tr.added a").first.get_attribute("href")
    page.screenshot(path=str(tmp_path / "2-version.png"), full_page=True)

    # Compare: the same question against the parent and the delta, entered/left highlighted.
    page.click("text=compare answers with the parent")
    page.fill("input[name=q]", "Eiffel Tower in Paris")
    page.fill("input[name=k]", "10")
    page.click("button:has-text('Compare')")
    page.wait_for_selector("table.side-by-side")
    assert page.locator("td.hit.entered").count() == 2 and page.locator("td.hit.left").count() == 1
    assert page.locator("td.hit.entered").first.evaluate("td => getComputedStyle(td).backgroundColor") \
        != page.locator("td.hit:not(.entered):not(.left)").first.evaluate("td => getComputedStyle(td).backgroundColor")
    page.screenshot(path=str(tmp_path / "3-compare.png"), full_page=True)

    # Rollback with the token to the full version, then promote the delta back.
    for target, button in ((built.full, "Roll back to this version"), (built.delta, "Promote")):
        page.goto(f"{url}/ui/versions/{target}")
        page.fill("#admin-token", TOKEN)
        page.click(f"button:has-text('{button}')")
        # (wait_for_function evaluates a string: the page's CSP refuses that, as it should)
        expect(page.locator("#action-result.ok")).to_contain_text("done")
        wait_for(lambda t=target: built.store.current().version == t)
        page.wait_for_load_state("load")
        page.goto(f"{url}/ui")
        expect(page.locator("header .serving")).to_have_text(f"serving: {target}")
        page.screenshot(path=str(tmp_path / f"4-after-{button.split()[0].lower()}.png"), full_page=True)
    assert len(page.dialogs) == 2 and "Roll CURRENT back" in page.dialogs[0]
    history = [h.action for h in built.store.history()]
    assert history[-2:] == ["rollback", "promote"]
    page.goto(f"{url}/ui/history")
    assert "rollback" in page.inner_text("table")
    page.screenshot(path=str(tmp_path / "5-history.png"), full_page=True)
    assert page.errors == []
    # the token was never kept: no cookie, nothing in storage
    assert page.context.cookies() == [] and page.evaluate("localStorage.length + sessionStorage.length") == 0


def test_hostile_title_and_link_show_as_text_in_the_browser(console, page, tmp_path):
    built, url = console
    alerts: list[str] = page.dialogs
    page.goto(f"{url}/ui/compare?a={built.full}&b={built.hostile}&k=10&q=markup")
    page.wait_for_selector("table.side-by-side")
    body = page.inner_text("body")
    assert XSS_TITLE in body and "javascript:alert(3)" in body  # shown as text
    assert page.locator("a[href^='javascript:']").count() == 0
    assert page.locator("main script").count() == 0
    assert XSS_TEXT.split(" or ")[0] in body
    page.screenshot(path=str(tmp_path / "6-xss.png"), full_page=True)
    assert alerts == [] and page.errors == []
