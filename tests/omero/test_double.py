"""The double's strictness, one rule a test, so that none can silently relax.

Each rule is one a real OMERO server enforces (the class named in each test is
where OMERO does it). The tests speak to the double with the real omero-py
client over Ice, in a short script run by the OMERO Python (the service's own
Python has no omero-py), and print what they saw as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ADMIN_PASSWORD, truncated_tiff
from helpers import wait_until

pytestmark = pytest.mark.omero

PRELUDE = r'''
import hashlib, json, os, sys, time
import omero, omero.clients, omero.callbacks, omero.cmd, omero.grid, omero.model, omero.sys
from omero.model.enums import ChecksumAlgorithmSHA1160
from omero.rtypes import rbool, rlong, rstring, unwrap
PORT, ADMIN_PASSWORD = int(sys.argv[1]), sys.argv[2]

def client():
    return omero.client(pmap=["--omero.host=127.0.0.1", f"--omero.port={PORT}"])

def login(user, password):
    c = client()
    c.createSession(user, password)
    return c

def admin():
    return login("admin", ADMIN_PASSWORD)

def sudo(adm, user, group, ttl=600000, tti=None):
    svc = adm.getSession().getSessionService()
    p = omero.sys.Principal(name=user, group=group, eventType="User")
    s = svc.createSessionWithTimeout(p, ttl) if tti is None else svc.createSessionWithTimeouts(p, ttl, tti)
    c = client()
    c.joinSession(s.getUuid().getValue())
    return c, s

def failure(fn):
    """[exception class, message] of what fn raised, or None."""
    try:
        fn()
    except omero.ServerError as e:
        return [type(e).__name__, e.message]
    return None

def dataset(c, name="d"):
    d = omero.model.DatasetI()
    d.setName(rstring(name))
    return c.getSession().getUpdateService().saveAndReturnObject(d).getId().getValue()

def screen(c, name="s"):
    s = omero.model.ScreenI()
    s.setName(rstring(name))
    return c.getSession().getUpdateService().saveAndReturnObject(s).getId().getValue()

def start_import(c, paths, target=None, write=True):
    """importFileset, upload (the zero-byte first write only when ``write``), verifyUpload: the handle."""
    fs = omero.model.FilesetI()
    for p in paths:
        e = omero.model.FilesetEntryI()
        e.setClientPath(rstring(os.path.abspath(p)))
        fs.addFilesetEntry(e)
    job = omero.model.UploadJobI()
    job.setVersionInfo([omero.model.NamedValue("test", "1")])
    fs.linkJob(job)
    settings = omero.grid.ImportSettings()
    settings.doThumbnails, settings.noStatsInfo = rbool(False), rbool(True)
    settings.checksumAlgorithm = omero.model.ChecksumAlgorithmI()
    settings.checksumAlgorithm.value = rstring(ChecksumAlgorithmSHA1160)
    if target:
        settings.userSpecifiedTarget = target
    proc = c.getManagedRepository().importFileset(fs, settings)
    hashes = []
    for i, p in enumerate(paths):
        data = open(p, "rb").read()
        rfs = proc.getUploader(i)
        if write:
            rfs.write(b"", 0, 0)
        if data:
            rfs.write(data, 0, len(data))
        rfs.close()
        hashes.append(hashlib.sha1(data).hexdigest())
    return proc, proc.verifyUpload(hashes)

def finish(c, handle, seconds=60):
    cb = omero.callbacks.CmdCallbackI(c, handle)
    rsp = cb.loop(seconds * 2, 500)
    cb.close(True)
    if isinstance(rsp, omero.cmd.ERR):
        return {"err": rsp.name, "message": dict(rsp.parameters or {}).get("message", "")}
    if not hasattr(rsp, "pixels"):
        return {"ok": type(rsp).__name__}
    return {"images": [px.getImage().getId().getValue() for px in rsp.pixels],
            "names": [unwrap(px.getImage().getName()) for px in rsp.pixels]}

def out(**kw):
    """Print what was seen and end at once (no orderly Ice shutdown: the test is over)."""
    print(json.dumps(kw), flush=True)
    os._exit(0)
'''


def run(omero_python, double, script, tmp_path=None, timeout=120):
    """Run ``script`` (after PRELUDE) against ``double``; what it printed with out()."""
    proc = subprocess.run([omero_python, "-c", PRELUDE + script, str(double.port), ADMIN_PASSWORD],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- sessions (SessionBean, SessionManagerImpl, SessionCache) -----------------


def test_create_session_with_timeout_is_an_absolute_lifetime(omero_python, double):
    # SessionBean.createSessionWithTimeout(p, ms) = createSessionWithTimeouts(p, ms, 0):
    # the number is the time to live; calls (keep-alives) do not extend it.
    seen = run(omero_python, double, '''
c, s = sudo(admin(), "jdoe", "lab", ttl=1500)
sf = c.getSession()
deadline, error = time.monotonic() + 20, None
while error is None and time.monotonic() < deadline:
    error = failure(lambda: sf.keepAlive(None))
    time.sleep(0.2)
out(ttl=unwrap(s.getTimeToLive()), tti=unwrap(s.getTimeToIdle()), error=error)
''')
    assert seen["ttl"] == 1500 and seen["tti"] == 0
    assert seen["error"][0] == "SessionTimeoutException" and "exceeded timeToLive" in seen["error"][1]


def test_an_idle_session_expires_and_a_keep_alive_holds_it(omero_python, double):
    seen = run(omero_python, double, '''
c, s = sudo(admin(), "jdoe", "lab", ttl=0, tti=1000)
sf = c.getSession()
start = time.monotonic()
while time.monotonic() - start < 2.5:   # two and a half idle timeouts, kept alive
    sf.keepAlive(None)
    time.sleep(0.2)
kept = failure(lambda: sf.getAdminService().getEventContext())
time.sleep(1.5)                          # one idle timeout and a half without a call
out(kept=kept, after=failure(lambda: sf.getAdminService().getEventContext()))
''')
    assert seen["kept"] is None
    assert seen["after"][0] == "SessionTimeoutException" and "exceeded timeToIdle" in seen["after"][1]


def test_close_session_counts_references(omero_python, double):
    # SessionManagerImpl.close: one reference less; the session ends at none.
    seen = run(omero_python, double, '''
adm = admin()
c, s = sudo(adm, "jdoe", "lab")
svc = adm.getSession().getSessionService()
c.closeSession()                        # the joined client's reference
alive = failure(lambda: svc.getSession(s.getUuid().getValue()))
out(alive=alive, close=svc.closeSession(s), again=svc.closeSession(s))
''')
    assert seen["alive"] is None and seen["close"] == -2 and seen["again"] == -1
    (sudo,) = [s for s in double.state()["sessions"] if s.get("sudo_by") is not None]
    assert sudo["closed"]


def test_sudo_needs_the_sudo_privilege_or_group_ownership(omero_python, double):
    # SessionBean.createSessionWithTimeouts: admins (with Sudo) for anyone, group owners
    # only into groups they lead, everyone else never.
    double.seed(users=[
        {"name": "ops", "password": "ops-pw", "groups": ["system"], "admin": True, "privileges": ["ModifyUser"]},
        {"name": "lead", "password": "lead-pw", "groups": ["lab"], "owner_of": ["lab"]},
    ])
    seen = run(omero_python, double, '''
out(restricted=failure(lambda: sudo(login("ops", "ops-pw"), "jdoe", "lab")),
    owner_own=failure(lambda: sudo(login("lead", "lead-pw"), "jdoe", "lab")),
    owner_other=failure(lambda: sudo(login("lead", "lead-pw"), "mary", "imaging")),
    user=failure(lambda: sudo(login("jdoe", "jdoe-pw"), "mary", "lab")))
''')
    assert seen["restricted"][0] == "SecurityViolation" and "Sudo" in seen["restricted"][1]
    assert seen["owner_own"] is None
    assert seen["owner_other"][0] == "SecurityViolation" and seen["user"][0] == "SecurityViolation"


def test_the_event_context_lists_an_administrators_privileges(omero_python, double):
    # OMERO 5.4+ (IAdmin.getEventContext, AdminPrivilege): a full administrator has every
    # privilege, a restricted one those granted, anyone else none. The importer's probe
    # reads them to tell an account that may not act for users (issue 14, low d).
    double.seed(users=[
        {"name": "ops", "password": "ops-pw", "groups": ["system"], "admin": True, "privileges": ["ModifyUser"]},
    ])
    seen = run(omero_python, double, '''
def privileges(c):
    ec = c.getSession().getAdminService().getEventContext()
    return [ec.isAdmin, sorted(ec.adminPrivileges)]
out(full=privileges(admin()), restricted=privileges(login("ops", "ops-pw")), user=privileges(login("jdoe", "jdoe-pw")))
''')
    assert seen["full"][0] is True and "Sudo" in seen["full"][1] and len(seen["full"][1]) == 15
    assert seen["restricted"] == [True, ["ModifyUser"]]
    assert seen["user"] == [False, []]


def test_the_omero_double_script_stops_the_double_on_sigterm(omero_python):
    # `make omero-double` under a process manager: SIGTERM to the script stops the double too
    # (it used to stop only on Ctrl-C, leaving the double serving).
    import re
    import signal
    import sys
    import urllib.request
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "omero-double"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, WATCHFOLDER_OMERO_PYTHON=omero_python))
    try:
        shown = ""
        for line in proc.stdout:
            shown += line
            if "stops it" in line:
                break
        control = re.search(r"control\s+(http://\S+)", shown).group(1)
        with urllib.request.urlopen(f"{control}/state", timeout=10) as answer:
            assert answer.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(OSError):  # nobody listens any more: the double is gone
            urllib.request.urlopen(f"{control}/state", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- uploads and the server-side import (FileBuffer, ManagedImportProcessI/RequestI) --


def test_an_uploaded_file_exists_only_after_its_first_write(omero_python, double, tmp_path):
    (tmp_path / "empty.fake").write_bytes(b"")
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
out(unwritten=failure(lambda: start_import(c, ["empty.fake"], write=False)),
    written=failure(lambda: start_import(c, ["empty.fake"], write=True)))
''', tmp_path)
    assert seen["unwritten"][0] == "InternalException" and "FileNotFoundException" in seen["unwritten"][1]
    assert seen["written"] is None


def test_a_dropped_upload_leaves_no_dispatch_behind(omero_python, double, tmp_path):
    # drop_after_bytes closes the connection inside a write. That write's dispatch must still
    # end: an unanswered one kept the adapter's destroy (the "down" switch) waiting for ever,
    # so a test switching the double down after a dropped upload timed out.
    (tmp_path / "big.fake").write_bytes(b"x" * 2 * 1024 * 1024)
    double.faults(drop_after_bytes=1024)
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
try:
    start_import(c, ["big.fake"])
    out(dropped=None)
except Exception as e:
    out(dropped=type(e).__name__)
''', tmp_path)
    assert seen["dropped"] is not None and double.state()["counters"]["drops"] == 1
    double.faults(down=True)  # the control call answers (it waited for the dropped write's dispatch)
    double.faults(down=None)
    assert double.state()["faults"] == {}


def test_a_closed_uploader_is_gone_and_verify_upload_names_the_mismatches(omero_python, double, tmp_path):
    # OMERO ends a stateful service when it is closed (a plate's 100,000 uploaders would
    # otherwise pile up in the double); ImportProcessI.verifyUpload answers a checksum
    # mismatch with the failing indexes, and a checksum list of the wrong length is refused.
    for name in ("a.fake", "b.fake", "c.fake"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    seen = run(omero_python, double, '''
import Ice
c = login("jdoe", "jdoe-pw")
fs = omero.model.FilesetI()
for p in ["a.fake", "b.fake", "c.fake"]:
    e = omero.model.FilesetEntryI()
    e.setClientPath(rstring(os.path.abspath(p)))
    fs.addFilesetEntry(e)
fs.linkJob(omero.model.UploadJobI())
settings = omero.grid.ImportSettings()
settings.checksumAlgorithm = omero.model.ChecksumAlgorithmI()
settings.checksumAlgorithm.value = rstring(ChecksumAlgorithmSHA1160)
proc = c.getManagedRepository().importFileset(fs, settings)
hashes, stores = [], []
for i, p in enumerate(["a.fake", "b.fake", "c.fake"]):
    data = open(p, "rb").read()
    rfs = proc.getUploader(i)
    rfs.write(data, 0, len(data))
    stores.append(rfs)
    hashes.append(hashlib.sha1(data).hexdigest())
for rfs in stores:
    rfs.close()
try:
    stores[0].size()
    after_close = None
except Ice.ObjectNotExistException:
    after_close = "ObjectNotExistException"
try:
    proc.verifyUpload([hashes[0], "0" * 40, hashes[2]])
    mismatch = None
except omero.ChecksumValidationException as e:
    mismatch = {"failing": {str(k): v for k, v in e.failingChecksums.items()}, "message": e.message}
out(after_close=after_close, mismatch=mismatch, short=failure(lambda: proc.verifyUpload(hashes[:2])),
    server_b=hashlib.sha1(open("b.fake", "rb").read()).hexdigest())
''', tmp_path)
    assert seen["after_close"] == "ObjectNotExistException"
    assert seen["mismatch"]["failing"] == {"1": seen["server_b"]}
    assert "1 file(s)" in seen["mismatch"]["message"] and "b.fake" in seen["mismatch"]["message"]
    assert seen["short"][0] == "ApiUsageException" and "2 checksums for a fileset of 3" in seen["short"][1]
    counters = double.state()["counters"]
    assert counters["uploaders_open"] == 0 and counters["max_uploaders_open"] == 3


def test_the_server_reads_with_bioformats_and_fails_what_it_cannot_read(omero_python, double, tmp_path,
                                                                        bioformats):
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 200)
    (tmp_path / "stage&series=2.fake").write_bytes(b"")
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
out(broken=finish(c, start_import(c, ["broken.tif"])[1]),
    series=finish(c, start_import(c, ["stage&series=2.fake"])[1]))
''', tmp_path)
    assert seen["broken"]["err"] and "broken.tif" in seen["broken"]["message"]
    assert "Exception" in seen["broken"]["message"]
    assert len(seen["series"]["images"]) == 2
    assert all(n.startswith("stage&series=2.fake [") for n in seen["series"]["names"])


def test_the_server_reads_every_plane_at_import(omero_python, double, tmp_path, converted):
    # As ManagedImportRequestI.pixelData: each plane is read for min/max and the checksum,
    # so a TIFF cut off after its header (which setId accepts) fails the import.
    good = converted["tile"][0].read_bytes()
    (tmp_path / "good.tif").write_bytes(good)
    (tmp_path / "bad.tif").write_bytes(truncated_tiff(good))
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
out(good=finish(c, start_import(c, ["good.tif"])[1]), bad=finish(c, start_import(c, ["bad.tif"])[1]))
''', tmp_path)
    assert len(seen["good"]["images"]) == 1
    assert seen["bad"]["err"] and "bad.tif" in seen["bad"]["message"] and "pixel data" in seen["bad"]["message"]


def test_only_plates_are_linked_to_a_screen(omero_python, double, tmp_path, bioformats):
    # The import links a plate to a Screen target; a non-plate image stays orphaned.
    (tmp_path / "cells.fake").write_bytes(b"")
    (tmp_path / "plate&plates=1&plateRows=1&plateCols=2&fields=1.fake").write_bytes(b"")
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
sid = screen(c)
out(sid=sid,
    cells=finish(c, start_import(c, ["cells.fake"], omero.model.ScreenI(sid, False))[1]),
    plate=finish(c, start_import(c, ["plate&plates=1&plateRows=1&plateCols=2&fields=1.fake"],
                                 omero.model.ScreenI(sid, False))[1]))
''', tmp_path)
    state = double.state()
    images = {i["id"]: i for i in state["images"]}
    (cells,) = seen["cells"]["images"]
    assert images[cells]["plate"] is None and images[cells]["dataset"] is None
    (plate,) = state["plates"]
    assert plate["screen"] == seen["sid"]
    assert {images[i]["plate"] for i in seen["plate"]["images"]} == {plate["id"]}


def test_closing_an_import_handle_cancels_the_import(omero_python, double, tmp_path):
    (tmp_path / "a.fake").write_bytes(b"")
    double.faults(import_delay=30)
    run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
proc, handle = start_import(c, ["a.fake"])
handle.close()
out(ok=True)
''', tmp_path)
    state = wait_until(lambda: (s := double.state())["counters"]["cancelled_imports"] and s, timeout=20,
                       message="the import to be cancelled")
    (fs,) = state["filesets"]
    assert fs["state"] == "cancelled" and state["images"] == []


def test_an_import_in_a_session_that_timed_out_fails(omero_python, double, tmp_path):
    (tmp_path / "a.fake").write_bytes(b"")
    double.faults(import_delay=3)
    seen = run(omero_python, double, '''
c, s = sudo(admin(), "jdoe", "lab", ttl=2000)
proc, handle = start_import(c, ["a.fake"])
time.sleep(3.5)
out(result=finish(admin(), handle))
''', tmp_path)
    assert seen["result"]["err"] == "session-lost" and "exceeded timeToLive" in seen["result"]["message"]


# -- queries and permissions (Hibernate, the security filter, Delete2) ---------


def test_hql_is_checked_against_the_models_property_names(omero_python, double):
    # The abstract Job has no versionInfo (UploadJob and MetadataImportJob do).
    seen = run(omero_python, double, '''
q = login("jdoe", "jdoe-pw").getSession().getQueryService()
p = omero.sys.ParametersI()
out(job=failure(lambda: q.findAllByQuery(
        "select fs from Fileset fs join fs.jobLinks l join l.child j join j.versionInfo v where v.name = 'x'", p)),
    typo=failure(lambda: q.findAllByQuery("select d from Dataset d where d.nmae = 'x'", p)),
    entity=failure(lambda: q.findAllByQuery("select d from Datset d", p)))
''')
    assert seen["job"][0] == "QueryException" and "versionInfo of: ome.model.Job" in seen["job"][1]
    assert seen["typo"][0] == "QueryException" and "nmae" in seen["typo"][1]
    assert seen["entity"][0] == "QueryException"


def test_find_sees_only_the_sessions_group(omero_python, double):
    # Another group's container: SecurityViolation "Cannot read"; a private group
    # hides other members' data.
    double.seed(groups=[{"name": "solo", "perms": "rw----"}],
                users=[{"name": "ann", "password": "ann-pw", "groups": ["solo"]},
                       {"name": "bob", "password": "bob-pw", "groups": ["solo"]}])
    seen = run(omero_python, double, '''
adm = admin()
mary_imaging, _ = sudo(adm, "mary", "imaging")
did = dataset(mary_imaging, "hers")
mary_lab, _ = sudo(adm, "mary", "lab")
ann = login("ann", "ann-pw")
private = dataset(ann, "private")
bob = login("bob", "bob-pw")
out(other_group=failure(lambda: mary_lab.getSession().getQueryService().find("Dataset", did)),
    own=mary_imaging.getSession().getQueryService().find("Dataset", did) is not None,
    private=bob.getSession().getQueryService().find("Dataset", private) is None)
''')
    assert seen["other_group"][0] == "SecurityViolation" and "Cannot read" in seen["other_group"][1]
    assert seen["own"] and seen["private"]


def test_delete2_deletes_the_fileset_its_images_and_files(omero_python, double, tmp_path):
    (tmp_path / "a.fake").write_bytes(b"abc")
    seen = run(omero_python, double, '''
c = login("jdoe", "jdoe-pw")
proc, handle = start_import(c, ["a.fake"])
out(images=finish(c, handle)["images"])
''', tmp_path)
    state = double.state()
    (fs,) = state["filesets"]
    path = fs["files"][0]["path"]
    assert open(path, "rb").read() == b"abc"
    seen = run(omero_python, double, f'''
c = login("jdoe", "jdoe-pw")
other = login("mary", "mary-pw")
refused = finish(other, other.getSession().submit(omero.cmd.Delete2(targetObjects={{"Fileset": [{fs["id"]}]}})))
done = finish(c, c.getSession().submit(omero.cmd.Delete2(targetObjects={{"Fileset": [{fs["id"]}]}})))
out(refused=refused, done=done)
''')
    assert seen["refused"].get("err") and seen["done"] == {"ok": "Delete2Response"}
    state = double.state()
    assert state["filesets"][0]["state"] == "deleted" and state["images"] == []
    assert not os.path.exists(path)


def test_faults_refuses_an_unknown_switch(double):
    # A misspelt switch ("import_eror") would otherwise change nothing, silently.
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        double.faults(import_eror="boom")
    assert refused.value.code == 400
    answer = json.loads(refused.value.read())
    assert "import_eror" in answer["error"] and "import_error" in answer["known"]
    assert double.state()["faults"] == {}
