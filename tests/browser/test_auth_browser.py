"""Signing in and out in the browser, the Users tab, and tabs hidden by role; the page runs under
our Content-Security-Policy without a single violation."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

RECORD_CSP = (
    "window.__csp = []; document.addEventListener('securitypolicyviolation', "
    "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)


def test_login_users_tab_role_tabs_and_logout(studio, page, login, browser):
    page.add_init_script(RECORD_CSP)
    page.goto(studio.url)
    expect(page).to_have_url(re.compile(r"/login$"))
    page.locator("#username").fill(studio.admin)
    page.locator("#password").fill("not the password")
    page.locator("#login-button").click()
    expect(page.locator(".error")).to_contain_text("Wrong username or password")

    login(page, studio)
    expect(page.locator("#session-line")).to_contain_text(f"Signed in as {studio.admin} (admin)")
    page.get_by_role("tab", name="Users").click()
    expect(page.locator("#users-table")).to_contain_text(studio.admin)
    page.locator("#users-new-name input, #users-new-name textarea").first.fill("ann")
    page.locator("#users-new-password input").fill("ann password 1")
    page.locator("#users-add-button").click()
    expect(page.locator("#users-status")).to_contain_text("Added ann as annotator")
    expect(page.locator("#users-table")).to_contain_text("annotator")
    assert page.evaluate("window.__csp") == []

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        ann = context.new_page()
        ann.set_default_timeout(20_000)
        login(ann, studio, "ann", "ann password 1")
        expect(ann.locator("#session-line")).to_contain_text("Signed in as ann (annotator)")
        for admin_tab in ["Projects", "Import", "Generate", "Browse", "Users"]:
            expect(ann.get_by_role("tab", name=admin_tab)).to_have_count(0)
        ann.locator("#logout-link").click()
        expect(ann).to_have_url(re.compile(r"/login$"))
        ann.goto(studio.url)
        expect(ann).to_have_url(re.compile(r"/login$"))
    finally:
        context.close()
