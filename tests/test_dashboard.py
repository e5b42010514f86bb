"""The dashboard in a real headless browser (Debian's chromium via chromedriver) against a real server."""

from __future__ import annotations

import shutil

import pytest
from api_support import acquisition, start_service, stop_service
from helpers import wait_until

from watchfolder.errors import PermanentImportError
from watchfolder.job import Progress

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (make test-deps installs them)",
)

webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (pip install -e '.[test]')")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service as DriverService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path)
    yield service
    stop_service(service)


def _login(browser, svc, token_name):
    browser.get(svc.server.url + "/?refresh=1")
    # The page redraws its tables every second: a row found just before a redraw is
    # stale when read; look again instead of failing.
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    field = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed() else None)
    field.send_keys(svc.tokens[token_name])
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(lambda d: d.find_element(By.ID, "board").is_displayed())
    assert not browser.find_element(By.ID, "login").is_displayed()
    return wait


def _row(browser, table, job_id):
    rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[data-job-id='{job_id}']")
    return rows[0] if rows else None


def test_dashboard_shows_progress_and_failure_and_retries_with_a_click(browser, svc):
    admin = svc.client("admin")
    running = admin.post("/api/v1/jobs", {"path": str(acquisition(svc.roots["drop"], "jdoe/a"))}).json["id"]
    failing = admin.post("/api/v1/jobs", {"path": str(acquisition(svc.roots["drop"], "jdoe/b"))}).json["id"]
    assert svc.store.claim("w1").id == running
    svc.store.report_progress(running, "w1", Progress("upload", 300, 600, 0, 1))
    assert svc.store.claim("w2").id == failing
    svc.store.fail(failing, "w2", PermanentImportError("unsupported file format: .xyz"))
    svc.store.set_component("watcher", "drop", {"path": "/data/drop", "mode": "polling", "health": "ok"})

    wait = _login(browser, svc, "admin")

    row = wait.until(lambda d: _row(d, "running", running))
    assert "50%" in row.find_element(By.CSS_SELECTOR, ".pct").text
    assert "upload" in row.text
    width = row.find_element(By.CSS_SELECTOR, ".bar .fill").get_attribute("style")
    assert "50%" in width
    failure = wait.until(lambda d: _row(d, "failures", failing))
    assert "unsupported file format: .xyz" in failure.find_element(By.CSS_SELECTOR, ".reason").text
    assert "drop" in browser.find_element(By.ID, "watchers").text
    counts = {dt.text: dd.text for dt, dd in zip(
        browser.find_elements(By.CSS_SELECTOR, "#queue-counts dt"),
        browser.find_elements(By.CSS_SELECTOR, "#queue-counts dd"),
        strict=True,
    )}
    assert (counts["running"], counts["failed"]) == ("1", "1")

    failure.find_element(By.CSS_SELECTOR, "button.retry").click()
    wait_until(lambda: svc.store.get(failing).state == "queued", timeout=20, message="the retry to reach the store")
    wait.until(lambda d: _row(d, "failures", failing) is None)
    assert "retry requested by api:admin" in svc.store.get(failing).history[-1].message

    # The running job's progress moves on: the page follows by itself.
    svc.store.report_progress(running, "w1", Progress("upload", 540, 600, 0, 1))
    wait.until(lambda d: "90%" in (_row(d, "running", running) or d.find_element(By.TAG_NAME, "body")).text)


def test_read_token_gets_no_buttons_and_submit_token_is_turned_away(browser, svc):
    admin = svc.client("admin")
    job = admin.post("/api/v1/jobs", {"path": str(acquisition(svc.roots["drop"], "jdoe/a"))}).json["id"]
    svc.store.claim("w1")
    svc.store.fail(job, "w1", PermanentImportError("unknown user"))

    wait = _login(browser, svc, "reader")
    row = wait.until(lambda d: _row(d, "failures", job))
    assert "unknown user" in row.text
    assert row.find_elements(By.CSS_SELECTOR, "button") == []

    browser.find_element(By.ID, "logout").click()
    field = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed() else None)
    field.send_keys(svc.tokens["portal"])
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    message = wait.until(lambda d: d.find_element(By.ID, "login-error").text or None)
    assert "role submit" in message
    assert not browser.find_element(By.ID, "board").is_displayed()


def test_run_without_tokens_prints_a_one_run_link_that_opens_the_dashboard(browser, make_config):
    from watchfolder.service import Parts, Service

    config = make_config(server={"enabled": True, "listen": "127.0.0.1:0", "tokens": []})
    service = Service(config, Parts(workers=False, watch=False, server=True, mail=False))
    service.start()
    try:
        assert service.run_token
        browser.get(f"{service.server.url}/#token={service.run_token}")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "board").is_displayed())
        assert "this-run-admin (admin)" in browser.find_element(By.ID, "who").text
        assert "token" not in browser.current_url  # taken out of the address bar
    finally:
        service.stop()
