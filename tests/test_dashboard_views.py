"""The dashboard's views in headless Chromium against a real server and a real watcher.

Each view renders with data (pending reasons from real drops, failures grouped by
reason, the throughput chart, the job list with filters and paging, a job page
with OMERO.web links, its history and log), its buttons act on the store, and a
PNG screenshot of each view is written under the test's temp dir for a reviewer
(``screens/``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from api_support import acquisition, make_config
from helpers import TARGET, wait_until, write_manifest

from watchfolder.errors import PermanentImportError
from watchfolder.job import Progress
from watchfolder.store import SQLiteStore
from watchfolder.watch.watcher import Watcher
from watchfolder.web.app import create_app
from watchfolder.web.server import Server

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

WEB = "https://omero.example.org"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


class Site:
    """A running server (OMERO importer config with a web_url, so pages link images), its store and a watcher."""

    def __init__(self, tmp_path, watch_config):
        config, self.tokens, self.roots = make_config(tmp_path, importer="omero")
        omero = dataclasses.replace(config.importer.omero, web_url=WEB + "/")
        self.config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
        self.store = SQLiteStore.from_config(self.config)
        self.server = Server(self.config, create_app(self.config, self.store))
        self.server.start()
        self.watcher = Watcher(watch_config, self.store, health_interval=0.1, status_interval=0.1)
        self.watcher.start()

    def stop(self):
        self.watcher.stop()
        self.server.stop()
        self.store.close()


@pytest.fixture
def site(tmp_path, make_config):
    drop = tmp_path / "drop-folder"
    drop.mkdir()
    watch = make_config(watch=[{"name": "lsm980", "path": str(drop), "mode": "events", "quiet_period": 0.3,
                                "missing_timeout": 600}]).watch[0]
    s = Site(tmp_path, watch)
    s.drop = drop
    yield s
    s.stop()


def _finish(store, spec, worker="w", result=None, error=None, progress=None):
    job, _ = store.enqueue(spec)
    claimed = store.claim(worker)
    assert claimed.id == job.id
    if progress:
        store.report_progress(job.id, worker, progress)
    if error:
        return store.fail(job.id, worker, error)
    return store.succeed(job.id, worker, result or {}, progress=progress)


def _spec(site, name, **kw):
    from watchfolder.watch.acquisition import from_path

    return from_path(acquisition(site.roots["drop"], name, **kw), source="api:portal")


def _login(browser, site, token_name="admin", hash_=""):
    browser.get(site.server.url + "/?refresh=30" + hash_)  # views refresh on every route change and action
    # The page refreshes itself every second: an element found may be replaced before it is read.
    wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
    field = wait.until(lambda d: d.find_element(By.ID, "token") if d.find_element(By.ID, "token").is_displayed() else None)
    field.send_keys(site.tokens[token_name])
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait.until(lambda d: d.find_element(By.ID, "board").is_displayed())
    return wait


def ids(browser, selector="#jobs tbody tr[data-job-id]") -> list[str]:
    """The job ids of the rows, read in one go (rows are replaced on every refresh)."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((r) => r.dataset.jobId)", selector)


def _go(browser, wait, hash_, ready):
    browser.execute_script("location.hash = arguments[0]", hash_)
    return wait.until(ready)


def test_views_render_with_data_buttons_act_and_screenshots_are_written(browser, site, tmp_path):
    shots = tmp_path / "screens"
    shots.mkdir()
    store = site.store
    # Jobs: OMERO and archive successes, importer failures that read alike, a rejection at detection.
    omero_job = _finish(store, _spec(site, "jdoe/slide3"), result={"image_ids": [101, 102], "fileset_ids": [7]},
                        progress=Progress("done", 4096, 4096, 1, 1))
    store.log(omero_job.id, "imported 2 images")
    archived = _finish(store, _spec(site, "asmith/plate", owner="asmith"),
                       result={"destination": "/archive/asmith/Brain atlas/slide 3/plate"},
                       progress=Progress("done", 3 * 1024 * 1024, 3 * 1024 * 1024, 1, 1))
    failed = [_finish(store, _spec(site, f"jdoe/bad{i}"), error=PermanentImportError(
        f"scan_{i}.xyz: no reader accepts this file; export it as OME-TIFF")) for i in range(3)]
    corrupt = _spec(site, "jdoe/corrupt")  # as the watcher rejects: marked so that a retry reads it again
    rejected, _ = store.reject(dataclasses.replace(corrupt, source="watch:lsm980",
                                                   extra={**corrupt.extra, "rejected": True}),
                               "checksum of a.tif does not match the manifest: the size is right but the content "
                               "differs, so waiting will not help")
    for i in range(26):  # more than a page of the job list
        store.enqueue(dataclasses.replace(_spec(site, "jdoe/queued"), idempotency_key=f"q{i}"))

    # Pending: real drops in the watched folder.
    plate = site.drop / "plate1"
    plate.mkdir()
    (plate / "d.tif").write_bytes(b"x" * 10)
    (plate / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [
        {"path": "a.tif", "size": 10}, {"path": "b/c.tif", "size": 10}, {"path": "d.tif", "size": 10}]}))
    write_manifest(site.drop / "short", {"x.tif": b"x" * 1000})
    manifest = json.loads((site.drop / "short" / "watchfolder.json").read_text())
    manifest["files"][0]["size"] = 4096
    (site.drop / "short" / "watchfolder.json").write_text(json.dumps(manifest))
    wait_until(lambda: len(store.pending_list()) == 2 and all(e.kind != "writing" for e in store.pending_list()),
               15, message="two pending acquisitions with reasons")

    # Overview: pending panel, failures by reason, throughput chart.
    wait = _login(browser, site)
    panel = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#pending [data-watch='lsm980'] tr[data-path='plate1']"))
    assert "waiting for 2 of 3 files (missing: a.tif, b/c.tif)" in panel.text
    short = browser.find_element(By.CSS_SELECTOR, "#pending tr[data-path='short']")
    assert "size of x.tif is 1,000 bytes, manifest says 4,096" in short.text
    assert "2 acquisitions not queued yet" in browser.find_element(By.CSS_SELECTOR, "#pending [data-watch='lsm980'] h3").text
    # The queue panel does not say "Nothing waiting." beside them.
    wait.until(lambda d: "2 acquisitions not queued yet" in d.find_element(By.ID, "oldest").text)
    group = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#failure-groups tr[data-count='3']"))
    assert "no reader accepts this file" in group.text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#failure-groups tbody tr")) == 2
    bars = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#throughput svg rect.bar-jobs") or None)
    assert len(bars) == 24 and sum(int(b.get_attribute("data-value")) for b in bars) == 2
    total_bytes = sum(float(b.get_attribute("data-value"))
                      for b in browser.find_elements(By.CSS_SELECTOR, "#throughput rect.bar-bytes"))
    assert total_bytes == 4096 + 3 * 1024 * 1024
    assert "3.0 MiB" in browser.find_element(By.ID, "throughput").text
    browser.find_element(By.ID, "range-168").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#throughput rect.bar-jobs")) == 28)
    browser.save_screenshot(str(shots / "dashboard.png"))
    browser.find_element(By.ID, "pending-panel").screenshot(str(shots / "pending.png"))

    # Job list: filters and paging.
    first_page = _go(browser, wait, "#/jobs", lambda d: ids(d) or None)
    assert len(first_page) == 25
    browser.find_element(By.ID, "next-page").click()
    older = wait.until(lambda d: (lambda got: got if got and got[0] != first_page[0] else None)(ids(d)))
    assert not set(older) & set(first_page) and str(omero_job.id) in older
    browser.find_element(By.ID, "first-page").click()
    wait.until(lambda d: ids(d)[:1] == first_page[:1])
    form = browser.find_element(By.ID, "filters")
    form.find_element(By.NAME, "q").send_keys("reader accepts")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: sorted(ids(d)) == sorted(str(j.id) for j in failed))
    _go(browser, wait, "#/jobs?state=succeeded&owner=asmith", lambda d: ids(d) == [str(archived.id)])
    browser.save_screenshot(str(shots / "jobs.png"))

    # A job page: OMERO.web links, history, files, log.
    link = _go(browser, wait, f"#/jobs/{omero_job.id}", lambda d: d.find_elements(By.CSS_SELECTOR, "#job-result a") or None)
    assert [a.get_attribute("href") for a in link] == [f"{WEB}/webclient/?show=image-{i}" for i in (101, 102)]
    assert browser.find_element(By.ID, "job-title").text == f"Job {omero_job.id}: succeeded"
    history = browser.find_element(By.ID, "job-history").text
    assert "queued" in history and "running" in history and "succeeded" in history
    assert "tile_001.ome.tiff" in browser.find_element(By.ID, "job-files").text
    assert "imported 2 images" in browser.find_element(By.ID, "job-log").text
    assert "100%" in browser.find_element(By.CSS_SELECTOR, "#job-progress .pct").text
    browser.save_screenshot(str(shots / "job.png"))
    _go(browser, wait, f"#/jobs/{archived.id}",
        lambda d: "Archived in /archive/asmith/Brain atlas/slide 3/plate" in d.find_element(By.ID, "job-result").text)

    # Buttons: a job rejected at detection offers no Retry (the cause is in its files), Dismiss acts.
    _go(browser, wait, f"#/jobs/{rejected.id}", lambda d: d.find_element(By.ID, "job-title").text.startswith(f"Job {rejected.id}"))
    actions = browser.find_element(By.ID, "job-actions")
    # Rejected: nothing was copied, nothing imported (not "Not finished." and "0% 0 B of 0 B").
    assert browser.find_element(By.ID, "job-result").text == "Not imported: see the reason above."
    assert browser.find_element(By.ID, "job-progress").text == "Nothing was copied."
    assert actions.find_elements(By.CSS_SELECTOR, "button.retry") == []
    assert "the cause is in the files" in actions.text
    actions.find_element(By.CSS_SELECTOR, "button.dismiss").click()
    wait_until(lambda: store.get(rejected.id).dismissed_at is not None, 20, message="the dismiss to reach the store")
    # An importer failure can be retried from its page.
    browser.execute_script("location.hash = arguments[0]", f"#/jobs/{failed[0].id}")
    wait.until(lambda d: d.execute_script(
        "const b = document.querySelector('#job-actions button.retry');"
        "if (!b || !document.querySelector('#job-title').textContent.startsWith(arguments[0])) return false;"
        "b.click(); return true;", f"Job {failed[0].id}:"))
    wait_until(lambda: store.get(failed[0].id).state == "queued", 20, message="the retry to reach the store")
    # ...and the overview's groups follow: 2 alike failures left, the dismissed one gone.
    _go(browser, wait, "#/", lambda d: d.find_elements(By.CSS_SELECTOR, "#failure-groups tr[data-count='2']") or None)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#failure-groups tbody tr")) == 1

    for name in ("dashboard", "pending", "jobs", "job"):
        assert (shots / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_job_address_past_2_53_is_not_rounded_and_duplicates_are_not_counted_as_imported(browser, site, tmp_path):
    """Issue 15 outside test, finding 12: ``#/jobs/99999999999999999999`` showed "no job
    '100000000000000000000'" (JS number rounding); duplicates counted as acquisitions imported."""
    first = _finish(site.store, _spec(site, "dup/a"), result={"files": ["tile_001.ome.tiff"]},
                    progress=Progress("import", 600, 600, 1, 1))
    _finish(site.store, dataclasses.replace(_spec(site, "dup/b"), idempotency_key="dup-b"),
            result={"duplicate_of": first.id, "files": [], "bytes": 0})
    wait = _login(browser, site)
    label = wait.until(lambda d: next((t.text for t in d.find_elements(By.CSS_SELECTOR, "#throughput text")
                                       if t.text.startswith("acquisitions imported")), None))
    assert label.startswith("acquisitions imported (and 1 duplicate(s) not counted): 1 in all")
    big = "99999999999999999999"
    title = _go(browser, wait, f"#/jobs/{big}",
                lambda d: d.find_element(By.ID, "job-title").text.startswith("No job") and d.find_element(By.ID, "job-title"))
    assert title.text == f"No job {big}: the id is too large (job ids go up to 9223372036854775807)"
    # The largest id is asked of the server as written (2^63 - 1 is not a double): its own answer.
    top = "9223372036854775807"
    _go(browser, wait, f"#/jobs/{top}", lambda d: f"no job {top} visible" in d.find_element(By.ID, "message").text)
    browser.save_screenshot(str(tmp_path / "job-id-too-large.png"))


def test_every_pending_count_is_one_definition_and_agrees(browser, site, tmp_path):
    """Issue 15 outside test, finding 5: the queue box, the pending panel and the watchers table
    counted differently (excluded, symlink and not-an-acquisition entries in some, not others):
    the watchers table counted the watcher's own list, the others the store's."""
    from watchfolder.status import collect_status

    plate = site.drop / "plate1"
    plate.mkdir()
    (plate / "d.tif").write_bytes(b"x" * 10)
    (plate / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [
        {"path": "a.tif", "size": 10}, {"path": "d.tif", "size": 10}]}))
    (site.drop / "acq1.tmp").mkdir()  # excluded (*.tmp)
    (site.drop / "acq1.tmp" / "x.tif").write_bytes(b"x")
    (site.drop / "link").symlink_to(plate)  # a symbolic link: never followed
    try:
        wait_until(lambda: {e.kind for e in site.store.pending_list()} >= {"waiting", "excluded", "symlink"}
                   and len(site.store.pending_list()) == 3, 20, message="one acquisition and two paths not taken")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[(e.path, e.kind) for e in site.store.pending_list()]}") from None
    kinds = sorted(e.kind for e in site.store.pending_list())
    status = collect_status(site.config, site.store)
    (watcher,) = status["watchers"]
    assert (watcher["pending"], watcher["not_imported"]) == (1, 2), kinds
    assert status["pending"] == {"acquisitions": 1, "not_imported": 2}

    wait = _login(browser, site)
    head = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#pending [data-watch='lsm980'] h3[data-acquisitions='1']"))
    assert head.text == ("lsm980: 1 acquisition not queued yet; 2 paths not imported "
                         "(excluded, links, not acquisitions)")
    wait.until(lambda d: "1 acquisition not queued yet (see Pending)" in d.find_element(By.ID, "oldest").text)
    cell = browser.find_element(By.CSS_SELECTOR, "#watchers td.pending-count")
    assert cell.text == "1" and "2 paths not imported" in cell.get_attribute("title")
    browser.save_screenshot(str(tmp_path / "pending-counts.png"))
