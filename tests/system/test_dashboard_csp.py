"""The dashboard still works under its Content-Security-Policy, in real headless Chromium
(issue 11 item 7): live prices and sparklines arrive, and the browser reports no CSP
violation (a too-tight policy would block a script, a style, the socket or a fetch)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.serverproc import ServerProcess
from tests.system.test_dashboard_browser import (
    FAST_BACKOFF,
    SPARKLINES_AT_LEAST,
    WAIT_MS,
    _wait_for_pjm_seq,
    browser,
)

__all__ = ["browser"]  # the fixture, shared with test_dashboard_browser

RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener('securitypolicyviolation',
  e => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--simulate", "--simulate-interval", "0.05") as proc:
        yield proc


def test_the_dashboard_runs_under_its_csp_without_violations(
    browser: Any, server: ServerProcess
) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(RECORD_VIOLATIONS)
    _wait_for_pjm_seq(server, 5)
    response = page.goto(f"{server.url}/?{FAST_BACKOFF}")
    assert response is not None
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    expect(page.locator("#conn-badge")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    page.wait_for_function(SPARKLINES_AT_LEAST, arg=5, timeout=WAIT_MS)  # history fetched
    assert page.evaluate("window.cspViolations") == []
    assert not [text for text in console_errors if "Content Security Policy" in text]
