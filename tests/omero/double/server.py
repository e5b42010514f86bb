"""An OMERO server double: real Ice on 127.0.0.1, built on omero-py's skeletons.

By hand: ``make omero-double`` (scripts/omero-double seeds an admin and a user and
prints ports and password). Run with the omero-py interpreter
(``.venv-omero/bin/python server.py [WORKDIR]``). It
prints one JSON line ``{"port": ICE_PORT, "control": HTTP_PORT}`` when ready
and serves until its stdin closes or it gets SIGTERM.

As strict as OMERO where the importer depends on it (each rule has its own test in
tests/omero/test_double.py): sessions expire by lifetime and idle time (SessionCache)
and close by reference count; only admins with Sudo, or group owners for their
groups, may create sessions for others; an uploaded file exists only after its
first write (FileBuffer), a closed uploader is gone, and verifyUpload names the
mismatching checksums by index (ImportProcessI); the server-side import reads the upload with
Bio-Formats (the child's jar, via bfgroup.py) and fails what it cannot read,
names multi-series images "name [series]" and links only plates to a screen;
it fails when its session timed out, and closing its handle cancels it; HQL is
checked against the model's property names; find and queries see only the
session's group (and in a private group only one's own data); Delete2 deletes.

It answers what the ``omero`` importer's child sends and nothing more: every
operation of every servant it hosts that it does not implement raises
``Ice.OperationNotExistException`` (the generated skeletons would otherwise
answer None, or never answer an async call, and the client would hang). HQL is
matched verbatim against the child's few queries.

Control channel (HTTP on 127.0.0.1, JSON):
    GET  /state            everything it holds (users, groups, sessions, containers,
                           filesets, images, annotations {id, kind, ns, values|text,
                           owner, group, images: [linked image ids]}, counters)
    POST /reset            back to an empty server (a fresh world; servants of old sessions
                           dropped); the process, its port and its JVM stay
    POST /seed             {"groups": [{"name", "perms"}], "users": [{"name", "password",
                           "email", "groups": [...], "admin": bool, "privileges": [...]
                           (a restricted admin's; default all), "owner_of": [groups]}]};
                           a user seeded again is updated, keeping its id
    POST /session          {"user", "group"?} -> {"uuid"}: a session as a web client holds one
    POST /session/close    {"uuid"}: that session ends (logged out, or timed out)
    POST /annotations      {"owner", "group", "kind": "tag"|"comment"|"map", "ns"?, "text"?}
                           -> {"id"}: an annotation that exists before the import
    POST /faults           merge switches (an unknown one: 400 naming the known ones); null clears one:
                           down (bool: listener closed, connections refused),
                           slow (seconds added to every upload write and login),
                           drop_after_bytes (int: drop the connection once that many
                           bytes of upload arrived; fires once),
                           import_error (str: server-side imports answer omero.cmd.ERR),
                           import_delay (seconds the server-side import takes),
                           session_defaults ({"ttl_ms", "tti_ms"} of password logins;
                           default no lifetime, 10 minutes idle),
                           hold_first_write (seconds: an upload's block at offset 0 waits
                           up to that long for a later block to be written first;
                           with writes kept in flight they land out of order),
                           fail_upload (a file name: the first write to an upload of a
                           file of that name raises omero.ResourceError, as RawFileBean
                           does on an IOException such as a full disk; fires once)
Counters include uploaders_open and max_uploaders_open (RawFileStores from
getUploader to their close, now and at most at once: the files a client uploads
in parallel), imports_in_progress and max_imports_in_progress (filesets from
importFileset to the end of their server-side import, now and at most at once),
overlapped_writes (writes that arrived while another write of
the same upload was still outstanding: being dispatched, or sent earlier and not
arrived yet) and out_of_order_writes (blocks that landed ahead of a gap and
waited for it to fill).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import Glacier2
import Ice
import omero
import omero.all  # noqa: F401 - every skeleton and model class
import omero.callbacks  # noqa: F401
import omero.cmd
import omero.grid
import omero.model
import omero.ObjectFactoryRegistrar as ofr
import omero.sys
from omero.rtypes import ObjectFactories, rint, rlong, rstring, unwrap

# The child's queries, verbatim (see watchfolder/omero_child/child.py).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "watchfolder", "omero_child"))
import child as C  # noqa: E402

# ---------------------------------------------------------------------------
# Strictness: unimplemented operations raise instead of answering None


def strict(cls):
    """Replace every skeleton operation ``cls`` does not implement with one that
    raises ``Ice.OperationNotExistException``; put ``@amd`` methods under their
    ``_async`` names, where Ice dispatches them."""
    for name, attr in list(cls.__dict__.items()):
        if hasattr(attr, "amd_name"):
            delattr(cls, name)
            setattr(cls, attr.amd_name, attr)
    for name in dir(cls):
        if name.startswith(("_", "ice_")):
            continue
        attr = getattr(cls, name)
        code = getattr(attr, "__code__", None)
        if code is None or not code.co_filename.endswith("_ice.py"):
            continue  # implemented here, or not an operation
        if name.endswith("_async"):
            def raiser(self, _cb, *args, _name=name, **kw):
                _cb.ice_exception(Ice.OperationNotExistException(operation=_name[:-6]))
        else:
            def raiser(self, *args, _name=name, **kw):
                raise Ice.OperationNotExistException(operation=_name)
        setattr(cls, name, raiser)
    return cls


def amd(fn):
    """Write an async operation as a plain function: its return value or
    exception goes to the callback."""

    def wrapper(self, _cb, *args, **kw):
        try:
            result = fn(self, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - every error goes back to the client
            _cb.ice_exception(exc)
        else:
            _cb.ice_response(result) if result is not _NOTHING else _cb.ice_response()

    wrapper.amd_name = wrapper.__name__ = fn.__name__ + "_async"
    return wrapper


_NOTHING = object()


# ---------------------------------------------------------------------------
# State


# OMERO's AdminPrivilege enumeration (a full administrator has all of them).
ALL_PRIVILEGES = ("Chgrp", "Chown", "DeleteFile", "DeleteManagedRepo", "DeleteOwned", "DeleteScriptRepo",
                  "ModifyGroup", "ModifyGroupMembership", "ModifyUser", "ReadSession", "Sudo",
                  "WriteFile", "WriteManagedRepo", "WriteOwned", "WriteScriptRepo")


class World:
    """Everything the double knows, under one lock."""

    def __init__(self):
        self.lock = threading.RLock()
        self.next = 100
        self.users = {}
        self.groups = {}
        self.sessions = {}
        self.connections = {}
        self.projects, self.datasets, self.screens, self.plates = {}, {}, {}, {}
        self.project_dataset = []
        self.filesets, self.images, self.annotations = {}, {}, {}
        self.original_files = {}
        # Annotation links on containers: (kind, parent id, annotation id).
        self.container_links = []
        self.faults = {}
        self.counters = {"bytes_written": 0, "writes": 0, "logins": 0, "failed_logins": 0,
                         "imports": 0, "drops": 0, "queries": 0,
                         "overlapped_writes": 0, "out_of_order_writes": 0,
                         "uploaders_open": 0, "max_uploaders_open": 0,
                         "imports_in_progress": 0, "max_imports_in_progress": 0, "cancelled_imports": 0,
                         "deleted_filesets": 0}
        self.add_group("system", "rw----", gid=0)
        self.add_group("user", "rw----", gid=1)
        self.add_user("root", "omero", "root@example.org", ["system", "user"], admin=True, uid=0)

    def new_id(self):
        with self.lock:
            self.next += 1
            return self.next

    def add_group(self, name, perms="rw----", gid=None):
        with self.lock:
            if name not in self.groups:
                self.groups[name] = {"id": self.new_id() if gid is None else gid, "name": name, "perms": perms}
            return self.groups[name]

    def add_user(self, name, password, email=None, groups=(), admin=False, uid=None, privileges=None,
                 owner_of=()):
        """``privileges``: a restricted admin's (OMERO's AdminPrivilege names, e.g. "Sudo");
        None gives a full admin all of them. ``owner_of``: groups the user leads. A name
        seeded again is updated in place (its id stays), as an admin edits a user."""
        with self.lock:
            if uid is None and name in self.users:
                uid = self.users[name]["id"]
            gids = [self.add_group(g)["id"] for g in groups]
            if "user" in self.groups and 1 not in gids:
                gids.append(1)
            self.users[name] = {"id": self.new_id() if uid is None else uid, "name": name,
                                "password": password, "email": email, "groups": gids, "admin": admin,
                                "privileges": list(ALL_PRIVILEGES if privileges is None else privileges),
                                "leader_of": [self.add_group(g)["id"] for g in owner_of]}
            return self.users[name]

    def user_by_id(self, uid):
        return next((u for u in self.users.values() if u["id"] == uid), None)

    def group_by_id(self, gid):
        return next((g for g in self.groups.values() if g["id"] == gid), None)

    def new_session(self, user, group, ttl_ms=None, tti_ms=None, refs=0):
        """A session as OMERO's SessionManagerImpl defines one: ``ttl_ms`` its absolute
        lifetime, ``tti_ms`` how long it survives without a call; 0 means no limit. The
        defaults are the server's (``omero.sessions.timeout``: 10 min idle, no lifetime),
        or those set by the ``session_defaults`` fault."""
        defaults = self.faults.get("session_defaults") or {}
        sid = str(uuid.uuid4())
        now = time.monotonic()
        self.sessions[sid] = {
            "uuid": sid, "user": user["id"], "group": group["id"], "closed": False, "refs": refs,
            "ttl_ms": int(defaults.get("ttl_ms", 0) if ttl_ms is None else ttl_ms),
            "tti_ms": int(defaults.get("tti_ms", 600000) if tti_ms is None else tti_ms),
            "started": now, "last": now, "ended_by": None,
        }
        return self.sessions[sid]

    def touch(self, session):
        """Check a session's timeouts as SessionCache does on each call, then count the call.
        Raises ``omero.SessionTimeoutException`` (and ends the session) when one has passed."""
        now = time.monotonic()
        live_ms = (now - session["started"]) * 1000
        idle_ms = (now - session["last"]) * 1000
        why = None
        if session["ttl_ms"] and live_ms > session["ttl_ms"]:
            why = f"exceeded timeToLive ({session['ttl_ms']}) by {int(live_ms - session['ttl_ms'])} ms"
        elif session["tti_ms"] and idle_ms > session["tti_ms"]:
            why = f"exceeded timeToIdle ({session['tti_ms']}) by {int(idle_ms - session['tti_ms'])} ms"
        if why:
            session["closed"], session["ended_by"] = True, why
            raise omero.SessionTimeoutException(None, None, f"Session ({session['uuid']}) {why}")
        session["last"] = now

    def dump(self):
        with self.lock:
            return {
                "users": {n: {k: v for k, v in u.items() if k != "password"} for n, u in self.users.items()},
                "groups": self.groups,
                "sessions": list(self.sessions.values()),
                "projects": list(self.projects.values()),
                "datasets": list(self.datasets.values()),
                "screens": list(self.screens.values()),
                "plates": list(self.plates.values()),
                "project_dataset": self.project_dataset,
                "filesets": list(self.filesets.values()),
                "images": list(self.images.values()),
                "annotations": list(self.annotations.values()),
                "original_files": [{k: v for k, v in f.items() if k != "sha1"} for f in self.original_files.values()],
                "container_links": self.container_links,
                "bioformats": SERVER_BF.reason if SERVER_BF.checked else "not used yet",
                "faults": self.faults,
                "counters": self.counters,
            }


WORLD = World()


def session_of(current):
    sid = current.ctx.get("omero.session.uuid") or current.id.name
    with WORLD.lock:
        session = WORLD.sessions.get(sid)
        if session is None or session["closed"]:
            raise omero.RemovedSessionException(None, None, f"no such session: {sid}")
        WORLD.touch(session)
    return session


def session_alive(sid):
    """Whether session ``sid`` is still open (its timeouts checked, not counted as a call)."""
    with WORLD.lock:
        session = WORLD.sessions.get(sid)
        if session is None or session["closed"]:
            return False
        last = session["last"]
        try:
            WORLD.touch(session)
        except omero.SessionTimeoutException:
            return False
        session["last"] = last
        return True


def details(obj, owner, group_id, writable=True):
    d = omero.model.DetailsI()
    d.setOwner(omero.model.ExperimenterI(owner, False))
    d.setGroup(omero.model.ExperimenterGroupI(group_id, False))
    perms = omero.model.PermissionsI("rwra--")
    # Restrictions, as a real server computes them for the caller: link, edit, delete, annotate.
    perms._restrictions = [not writable] * 4
    d.setPermissions(perms)
    obj._details = d
    return obj


def container(kind, rec, session):
    cls = {"project": omero.model.ProjectI, "dataset": omero.model.DatasetI,
           "screen": omero.model.ScreenI}[kind]
    obj = cls(rec["id"], True)
    obj.setName(rstring(rec["name"]))
    if rec.get("description"):
        obj.setDescription(rstring(rec["description"]))
    group = WORLD.group_by_id(rec["group"])
    writable = rec["owner"] == session["user"] or (group and group["perms"][4:5] == "w")
    return details(obj, rec["owner"], rec["group"], writable)


ANNOTATION_CLASSES = {"map": omero.model.MapAnnotationI, "comment": omero.model.CommentAnnotationI,
                      "tag": omero.model.TagAnnotationI, "file": omero.model.FileAnnotationI}


def can_link_annotation(rec, session):
    """Its owner may link an annotation; others only in read-annotate or read-write groups."""
    group = WORLD.group_by_id(rec["group"])
    return rec["owner"] == session["user"] or bool(group and group["perms"][4:5] in ("a", "w"))


def annotation(rec, session):
    obj = ANNOTATION_CLASSES[rec["kind"]](rec["id"], True)
    if rec.get("ns") is not None:
        obj.setNs(rstring(rec["ns"]))
    if rec["kind"] in ("comment", "tag"):
        obj.setTextValue(rstring(rec.get("text") or ""))
    if rec["kind"] == "file":
        if rec.get("description") is not None:
            obj.setDescription(rstring(rec["description"]))
        ofile = WORLD.original_files[rec["file"]]
        loaded = omero.model.OriginalFileI(ofile["id"], True)
        loaded.setName(rstring(ofile["name"]))
        loaded.setSize(rlong(ofile["size"]))
        if ofile.get("hash") is not None:
            loaded.setHash(rstring(ofile["hash"]))
        obj.setFile(loaded)
    return details(obj, rec["owner"], rec["group"], can_link_annotation(rec, session))


# ---------------------------------------------------------------------------
# Servants


def typed(prx_cls, current, name, category="svc"):
    return prx_cls.uncheckedCast(current.adapter.createProxy(Ice.Identity(name, category)))


@strict
class RouterI(Glacier2.Router):
    def getClientProxy(self, current=None):
        return None

    def getServerProxy(self, current=None):
        return current.adapter.createProxy(Ice.Identity("server", "router"))

    def addProxies(self, proxies, current=None):
        return []

    def getCategoryForClient(self, current=None):
        with WORLD.lock:
            con = WORLD.connections.setdefault(current.con.toString(), {"category": str(uuid.uuid4()), "session": None})
            return con["category"]

    def createSession_async(self, _cb, userId, password, current=None):
        slow = WORLD.faults.get("slow")
        if slow:
            time.sleep(float(slow))
        with WORLD.lock:
            joined = WORLD.sessions.get(userId)
            if joined is not None and password == userId and not joined["closed"]:
                try:
                    WORLD.touch(joined)
                except omero.SessionTimeoutException as exc:
                    _cb.ice_exception(Glacier2.PermissionDeniedException(exc.message))
                    return
                session = joined
            else:
                user = WORLD.users.get(userId)
                if user is None or user["password"] != password:
                    WORLD.counters["failed_logins"] += 1
                    _cb.ice_exception(Glacier2.PermissionDeniedException(f"Password check failed for '{userId}'"))
                    return
                group = WORLD.group_by_id(next(g for g in user["groups"] if g != 1))
                session = WORLD.new_session(user, group)
            WORLD.counters["logins"] += 1
            session["refs"] += 1
            con = WORLD.connections.setdefault(current.con.toString(), {"category": str(uuid.uuid4()), "session": None})
            con["session"] = session["uuid"]
            DOUBLE.add_servant(ServiceFactoryI(), Ice.Identity(session["uuid"], "sf"))
        _cb.ice_response(typed(Glacier2.SessionPrx, current, session["uuid"], "sf"))

    def destroySession(self, current=None):
        with WORLD.lock:
            con = WORLD.connections.pop(current.con.toString(), None)
            if not con or not con["session"]:
                return  # already gone: the client treats this as done
            session = WORLD.sessions.get(con["session"])
            if session:
                session["refs"] -= 1
                # As OMERO: a client that called detachOnDestroy leaves the session open.
                if session["refs"] <= 0 and not con.get("detach"):
                    session["closed"] = True

    def getSessionTimeout(self, current=None):
        return 600

    def getACMTimeout(self, current=None):
        return 60

    def refreshSession_async(self, _cb, current=None):
        _cb.ice_response()


@strict
class ServiceFactoryI(omero.api.ServiceFactory):
    def getAdminService(self, current=None):
        return typed(omero.api.IAdminPrx, current, "IAdmin")

    def getSessionService(self, current=None):
        return typed(omero.api.ISessionPrx, current, "ISession")

    def getQueryService(self, current=None):
        return typed(omero.api.IQueryPrx, current, "IQuery")

    def getUpdateService(self, current=None):
        return typed(omero.api.IUpdatePrx, current, "IUpdate")

    def getConfigService(self, current=None):
        return typed(omero.api.IConfigPrx, current, "IConfig")

    def sharedResources(self, current=None):
        return typed(omero.grid.SharedResourcesPrx, current, "SharedResources")

    def createRawFileStore(self, current=None):
        session_of(current)
        prx = DOUBLE.add_servant(RawFileStoreI(), Ice.Identity(str(uuid.uuid4()), "rfs"), current)
        return omero.api.RawFileStorePrx.uncheckedCast(prx)

    def setCallback(self, callback, current=None):
        pass

    def detachOnDestroy(self, current=None):
        with WORLD.lock:
            con = WORLD.connections.get(current.con.toString())
            if con is not None:
                con["detach"] = True

    def closeOnDestroy(self, current=None):
        pass

    def keepAlive(self, proxy, current=None):
        session_of(current)  # a call: resets the idle clock, or fails on a timed-out session
        return True

    def keepAllAlive(self, proxies, current=None):
        session_of(current)
        return []

    def activeServices(self, current=None):
        return []

    def destroy(self, current=None):
        pass

    def submit_async(self, _cb, req, current=None):
        try:
            session = session_of(current)
            if not isinstance(req, omero.cmd.Delete2):
                raise omero.ApiUsageException(None, None, f"the double cannot run {type(req).__name__}")
            deleted = []
            refused = []
            with WORLD.lock:
                for fid in (req.targetObjects or {}).get("Fileset", []):
                    fs = WORLD.filesets.get(fid)
                    if fs and fs["state"] != "deleted" and fs["owner"] == session["user"]:
                        delete_fileset(fs)
                        deleted.append(fid)
                    else:
                        refused.append(fid)
            handle = HandleI()
            if refused:
                handle.finish(omero.cmd.ERR(category="::omero::cmd::Delete2", name="cannot-delete",
                                            parameters={"message": f"cannot delete Fileset {refused}"}),
                              failure=True)
            else:
                handle.finish(omero.cmd.Delete2Response(deletedObjects={"ome.model.fileset.Fileset": deleted}))
            _cb.ice_response(DOUBLE.add_handle(handle, current))
        except Exception as exc:  # noqa: BLE001
            _cb.ice_exception(exc)


def delete_fileset(fs):
    """Delete2 on a fileset, as OMERO's graph deletion does it: its images, their plate,
    their annotation links and the uploaded files go; only a tombstone stays in state()."""
    image_ids = set(fs["images"])
    for image_id in image_ids:
        image = WORLD.images.pop(image_id, None)
        if image and image.get("plate"):
            WORLD.plates.pop(image["plate"], None)
    for ann in WORLD.annotations.values():
        ann["images"] = [i for i in ann["images"] if i not in image_ids]
    for f in fs["files"]:
        if f.get("path") and os.path.exists(f["path"]):
            os.unlink(f["path"])
    fs.update(state="deleted", images=[], files=[], deleted_images=sorted(image_ids))
    WORLD.counters["deleted_filesets"] += 1


def experimenter(user):
    exp = omero.model.ExperimenterI(user["id"], True)
    exp.setOmeName(rstring(user["name"]))
    exp.setFirstName(rstring(user["name"]))
    exp.setLastName(rstring(user["name"]))
    if user.get("email"):
        exp.setEmail(rstring(user["email"]))
    return exp


def experimenter_group(group):
    grp = omero.model.ExperimenterGroupI(group["id"], True)
    grp.setName(rstring(group["name"]))
    return grp


@strict
class AdminI(omero.api.IAdmin):
    @amd
    def getEventContext(self, current=None):
        s = session_of(current)
        user, group = WORLD.user_by_id(s["user"]), WORLD.group_by_id(s["group"])
        return omero.sys.EventContext(
            sessionUuid=s["uuid"], userId=user["id"], userName=user["name"], groupId=group["id"],
            groupName=group["name"], isAdmin=user["admin"], memberOfGroups=list(user["groups"]),
            leaderOfGroups=list(user["leader_of"]), eventType="User",
            # As OMERO 5.4+: the names of an administrator's privileges (a full one has all), none for others.
            adminPrivileges=list(user["privileges"]) if user["admin"] else [],
            groupPermissions=omero.model.PermissionsI(group["perms"]),
        )

    @amd
    def lookupExperimenter(self, name, current=None):
        session_of(current)
        user = WORLD.users.get(name)
        if user is None:
            raise omero.ApiUsageException(None, None, f"No such experimenter: {name}")
        return experimenter(user)

    @amd
    def getExperimenter(self, uid, current=None):
        session_of(current)
        user = WORLD.user_by_id(uid)
        if user is None:
            raise omero.ApiUsageException(None, None, f"No such experimenter: {uid}")
        return experimenter(user)

    @amd
    def lookupGroup(self, name, current=None):
        session_of(current)
        group = WORLD.groups.get(name)
        if group is None:
            raise omero.ApiUsageException(None, None, f"No such group: {name}")
        return experimenter_group(group)

    @amd
    def getMemberOfGroupIds(self, exp, current=None):
        session_of(current)
        return list(WORLD.user_by_id(exp.getId().getValue())["groups"])

    @amd
    def getDefaultGroup(self, uid, current=None):
        session_of(current)
        user = WORLD.user_by_id(uid)
        return experimenter_group(WORLD.group_by_id(next(g for g in user["groups"] if g != 1)))


@strict
class SessionServiceI(omero.api.ISession):
    @amd
    def createSessionWithTimeout(self, principal, ttl, current=None):
        # As SessionBean: the one number is the session's lifetime; no idle timeout.
        return self._create(principal, ttl, 0, current)

    @amd
    def createSessionWithTimeouts(self, principal, ttl, tti, current=None):
        return self._create(principal, ttl, tti, current)

    def _create(self, principal, ttl, tti, current):
        """Sudo as SessionBean/SessionManagerImpl allow it: an administrator with the Sudo
        privilege for anyone; a group owner only into a group they lead; others never."""
        s = session_of(current)
        caller = WORLD.user_by_id(s["user"])
        with WORLD.lock:
            user = WORLD.users.get(principal.name)
            if user is None:
                raise omero.ApiUsageException(None, None, f"No such user: {principal.name}")
            group = WORLD.groups.get(principal.group)
            if group is None or group["id"] not in user["groups"]:
                raise omero.SecurityViolation(None, None, f"{principal.name} is not in group {principal.group}")
            if caller["admin"]:
                if "Sudo" not in caller["privileges"]:
                    raise omero.SecurityViolation(
                        None, None, "Admin restrictions prevent creating sessions for other users (no Sudo privilege)")
            elif group["id"] not in caller["leader_of"]:
                raise omero.SecurityViolation(
                    None, None, f"Group sudo is not permitted for group {group['name']} (gid={group['id']})")
            # Created with one reference, as SessionManagerImpl.createSession counts it.
            session = WORLD.new_session(user, group, ttl_ms=ttl, tti_ms=tti, refs=1)
            session["sudo_by"] = s["user"]
        out = omero.model.SessionI(WORLD.new_id(), True)
        out.setUuid(rstring(session["uuid"]))
        out.setTimeToLive(rlong(ttl))
        out.setTimeToIdle(rlong(tti))
        return out

    @amd
    def getSession(self, sid, current=None):
        session = WORLD.sessions.get(sid)
        if session is None:
            raise omero.RemovedSessionException(None, None, f"no session {sid}")
        out = omero.model.SessionI(WORLD.new_id(), True)
        out.setUuid(rstring(sid))
        return out

    @amd
    def closeSession(self, session, current=None):
        """As SessionManagerImpl.close: one reference less; closed at none (-2); -1 if unknown."""
        with WORLD.lock:
            rec = WORLD.sessions.get(unwrap(session.getUuid()))
            if rec is None or rec["closed"]:
                return -1
            rec["refs"] -= 1
            if rec["refs"] < 1:
                rec["closed"], rec["ended_by"] = True, "closeSession"
                return -2
            return rec["refs"]


@strict
class ConfigI(omero.api.IConfig):
    @amd
    def getConfigValue(self, key, current=None):
        return ""

    @amd
    def getVersion(self, current=None):
        return "5.6.0-double"


def params_of(params):
    return {k: unwrap(v) for k, v in ((params.map if params else None) or {}).items()}


# ---------------------------------------------------------------------------
# HQL: every query is checked against the model's property names, as Hibernate
# resolves them, before it is matched (verbatim) against the child's few queries.

# Where a property leads (the model's *.ome.xml relationships the child's queries walk).
MODEL_LINKS = {
    ("Fileset", "usedFiles"): "FilesetEntry", ("Fileset", "jobLinks"): "FilesetJobLink",
    ("Fileset", "images"): "Image", ("FilesetEntry", "fileset"): "Fileset",
    ("FilesetEntry", "originalFile"): "OriginalFile",
    ("FilesetJobLink", "parent"): "Fileset", ("FilesetJobLink", "child"): "Job",
    ("UploadJob", "versionInfo"): "NamedValue", ("MetadataImportJob", "versionInfo"): "NamedValue",
    ("Image", "fileset"): "Fileset",
    ("ImageAnnotationLink", "parent"): "Image", ("ImageAnnotationLink", "child"): "Annotation",
    ("DatasetAnnotationLink", "parent"): "Dataset", ("DatasetAnnotationLink", "child"): "Annotation",
    ("ScreenAnnotationLink", "parent"): "Screen", ("ScreenAnnotationLink", "child"): "Annotation",
    ("FileAnnotation", "file"): "OriginalFile",
    ("ProjectDatasetLink", "parent"): "Project", ("ProjectDatasetLink", "child"): "Dataset",
    ("Details", "owner"): "Experimenter", ("Details", "group"): "ExperimenterGroup",
}
HQL_KEYWORDS = {"select", "from", "where", "join", "left", "right", "inner", "outer", "fetch", "on", "with",
                "and", "or", "not", "in", "order", "by", "group", "having", "as", "distinct", "is", "null"}


def model_properties(entity):
    """The properties of model class ``entity`` (inherited ones included), from omero-py's classes."""
    import inspect

    if entity == "Details":
        return {"owner", "group", "permissions", "creationEvent", "updateEvent", "externalInfo"}
    if entity == "NamedValue":
        return {"name", "value"}
    cls = getattr(omero.model, entity, None)
    if cls is None or not isinstance(cls, type):
        return None
    props = set()
    for name in inspect.signature(cls.__init__).parameters:
        if name.startswith("_"):
            name = name[1:]
            for suffix in ("Seq", "Loaded", "CountPerOwner"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            props.add(name)
    return props


def check_hql(query):
    """Raise ``omero.QueryException`` as Hibernate would for an unknown entity or property."""
    import re

    text = re.sub(r"'[^']*'", "''", query)
    text = re.sub(r":\w+", ":p", text)
    aliases = {}

    def resolve(start, path, what):
        entity = start
        for prop in path:
            if prop == "id":
                entity = None
                continue
            if entity is None:
                raise omero.QueryException(None, None, f"could not resolve property: {prop} ({what})")
            props = model_properties(entity)
            if props is None or prop not in props:
                raise omero.QueryException(
                    None, None, f"could not resolve property: {prop} of: ome.model.{entity} ({what})")
            entity = MODEL_LINKS.get((entity, prop), "Details" if prop == "details" else None)
        return entity

    # "from Entity e", "..., Entity e" (theta join), "join [fetch] e.path x": in order.
    alias_re = r"(?:\s+(?:as\s+)?(?!(?:join|where|left|right|inner|outer|order|group|fetch|on|with)\b)([a-z]\w*))?"
    pattern = (r"(?:\bfrom\s+|,\s*)([A-Z]\w*)" + alias_re
               + r"|\bjoin\s+(?:fetch\s+)?([a-z]\w*(?:\.\w+)+)" + alias_re)
    for m in re.finditer(pattern, text):
        source, alias = (m.group(1), m.group(2) or "") if m.group(1) else (m.group(3), m.group(4) or "")
        if alias.lower() in HQL_KEYWORDS:
            alias = ""
        head, *path = source.split(".")
        if not path:
            if model_properties(head) is None:
                if head in aliases:
                    continue
                raise omero.QueryException(None, None, f"{head} is not mapped")
            entity = head
        else:
            if head not in aliases:
                raise omero.QueryException(None, None, f"unknown alias {head} in {source}")
            entity = resolve(aliases[head], path, source)
        if alias:
            aliases[alias] = entity
    for head, rest in re.findall(r"\b([a-z]\w*)\.(\w+(?:\.\w+)*)", text):
        if head in aliases:
            resolve(aliases[head], rest.split("."), f"{head}.{rest}")


def visible(rec, session):
    """Whether a query in ``session`` sees ``rec``: only its current group's data, and in a
    private group (rw----) only the user's own (an admin or the group's owner sees all)."""
    if rec is None or rec.get("group") != session["group"]:
        return False
    user = WORLD.user_by_id(session["user"])
    group = WORLD.group_by_id(rec["group"])
    group_readable = bool(group and group["perms"][2:3] == "r")
    return rec.get("owner") == session["user"] or group_readable or user["admin"] or rec["group"] in user["leader_of"]


def readable(rec, session, label):
    """find() by id as the server answers it: another group's object raises
    SecurityViolation ("Cannot read"), an invisible one in the group is None."""
    if rec is None:
        return False
    if rec.get("group") != session["group"]:
        raise omero.SecurityViolation(None, None, f"Cannot read {label}")
    return visible(rec, session)


@strict
class QueryI(omero.api.IQuery):
    @amd
    def find(self, klass, oid, current=None):
        s = session_of(current)
        kind = klass.replace("omero.model.", "").rstrip("I").lower()
        if kind == "annotation":
            # Polymorphic, as OMERO's find("Annotation", id): the concrete class comes back.
            rec = WORLD.annotations.get(oid)
            if not readable(rec, s, f"ome.model.annotations.Annotation:Id_{oid}"):
                return None
            return annotation(rec, s)
        table = {"dataset": WORLD.datasets, "project": WORLD.projects, "screen": WORLD.screens}.get(kind)
        if table is None:
            raise omero.ApiUsageException(None, None, f"the double cannot find {klass}")
        rec = table.get(oid)
        if not readable(rec, s, f"ome.model.containers.{kind.capitalize()}:Id_{oid}"):
            return None
        return container(kind, rec, s)

    @amd
    def findAllByQuery(self, query, params, current=None):
        s = session_of(current)
        p = params_of(params)
        WORLD.counters["queries"] += 1
        check_hql(query)
        with WORLD.lock:
            if query == C.Q_JOB_ATTACHMENTS:
                recs = [a for a in WORLD.annotations.values() if a["kind"] == "file" and a["ns"] == p["ns"]
                        and a.get("description") in p["keys"] and a["owner"] == p["uid"] and visible(a, s)]
                return [annotation(a, s) for a in sorted(recs, key=lambda a: a["id"])]
            if query in (C.Q_PROJECT, C.Q_DATASET, C.Q_SCREEN):
                kind = {C.Q_PROJECT: "project", C.Q_DATASET: "dataset", C.Q_SCREEN: "screen"}[query]
                table = {"project": WORLD.projects, "dataset": WORLD.datasets, "screen": WORLD.screens}[kind]
                recs = [r for r in table.values() if r["name"] == p["name"] and r["owner"] == p["uid"]
                        and r["group"] == p["gid"] and visible(r, s)]
                return [container(kind, r, s) for r in sorted(recs, key=lambda r: r["id"])]
            if query == C.Q_DATASET_IN_PROJECT:
                ids = [d for pid, d in WORLD.project_dataset if pid == p["pid"]]
                recs = [WORLD.datasets[d] for d in sorted(ids)
                        if WORLD.datasets[d]["name"] == p["name"] and visible(WORLD.datasets[d], s)]
                return [container("dataset", r, s) for r in recs]
            if query == C.Q_JOB_FILESETS:
                out = []
                for fs in WORLD.filesets.values():
                    if fs["state"] == "deleted" or fs["owner"] != p["uid"] or not visible(fs, s):
                        continue
                    if dict(fs["version_info"]).get(p["marker"]) != p["key"]:
                        continue
                    obj = omero.model.FilesetI(fs["id"], True)
                    for path in fs["client_paths"]:
                        entry = omero.model.FilesetEntryI()
                        # A real server keeps client paths without the leading '/'.
                        entry.setClientPath(rstring(path.lstrip("/")))
                        obj.addFilesetEntry(entry)
                    out.append(details(obj, fs["owner"], fs["group"]))
                return out
        raise omero.ApiUsageException(None, None, f"the OMERO double does not answer this query: {query}")

    @amd
    def projection(self, query, params, current=None):
        s = session_of(current)
        p = params_of(params)
        WORLD.counters["queries"] += 1
        check_hql(query)
        with WORLD.lock:
            if query == C.Q_FILESET_IMAGES:
                rows = [(i["id"], i["fileset"]) for i in WORLD.images.values()
                        if i["fileset"] in p["ids"] and visible(i, s)]
                return [[rlong(a), rlong(b)] for a, b in sorted(rows)]
            if query in C.Q_ANNOTATION_LINKS.values():
                kind = next(k for k, q in C.Q_ANNOTATION_LINKS.items() if q == query).lower()
                if kind == "image":
                    rows = {(i, a["id"]) for a in WORLD.annotations.values() if a["id"] in p["ids"]
                            and visible(a, s) for i in a["images"]}
                else:
                    rows = {(pid, aid) for k, pid, aid in WORLD.container_links if k == kind and aid in p["ids"]}
                return [[rlong(a), rlong(b)] for a, b in sorted(rows)]
            if query == C.Q_ANNOTATED_IMAGES:
                rows = {i for a in WORLD.annotations.values() if a["ns"] == p["ns"] and visible(a, s)
                        for i in a["images"] if i in p["ids"]}
                return [[rlong(i)] for i in sorted(rows)]
        raise omero.ApiUsageException(None, None, f"the OMERO double does not answer this query: {query}")


@strict
class UpdateI(omero.api.IUpdate):
    def _save(self, obj, s):
        with WORLD.lock:
            base = {"owner": s["user"], "group": s["group"]}
            for cls, kind, table in ((omero.model.ProjectI, "project", WORLD.projects),
                                     (omero.model.DatasetI, "dataset", WORLD.datasets),
                                     (omero.model.ScreenI, "screen", WORLD.screens)):
                if isinstance(obj, cls):
                    rec = dict(base, id=WORLD.new_id(), name=unwrap(obj.getName()),
                               description=unwrap(obj.getDescription()))
                    table[rec["id"]] = rec
                    return container(kind, rec, s)
            if isinstance(obj, omero.model.ProjectDatasetLinkI):
                pid, did = obj.getParent().getId().getValue(), obj.getChild().getId().getValue()
                for rec in (WORLD.projects.get(pid), WORLD.datasets.get(did)):
                    if rec is None or rec["group"] != s["group"]:
                        raise omero.SecurityViolation(None, None, "cannot link objects of another group")
                WORLD.project_dataset.append((pid, did))
                return omero.model.ProjectDatasetLinkI(WORLD.new_id(), False)
            for kind, cls in ANNOTATION_CLASSES.items():
                if type(obj) is cls:
                    rec = dict(base, id=WORLD.new_id(), kind=kind, ns=unwrap(obj.getNs()), images=[])
                    if kind == "map":
                        rec["values"] = [[nv.name, nv.value] for nv in obj.getMapValue() or []]
                    elif kind == "file":
                        fid = obj.getFile().getId().getValue() if obj.getFile() is not None else None
                        ofile = WORLD.original_files.get(fid)
                        if ofile is None or ofile["group"] != s["group"]:
                            raise omero.ValidationException(None, None, f"no original file {fid} in this group")
                        rec["file"] = fid
                        rec["description"] = unwrap(obj.getDescription())
                    else:
                        rec["text"] = unwrap(obj.getTextValue())
                    WORLD.annotations[rec["id"]] = rec
                    return annotation(rec, s)
            if isinstance(obj, omero.model.ImageAnnotationLinkI):
                iid, aid = self._check_link(obj, s)
                WORLD.annotations[aid]["images"].append(iid)
                return omero.model.ImageAnnotationLinkI(WORLD.new_id(), False)
            if isinstance(obj, (omero.model.DatasetAnnotationLinkI, omero.model.ScreenAnnotationLinkI)):
                kind = "dataset" if isinstance(obj, omero.model.DatasetAnnotationLinkI) else "screen"
                pid, aid = obj.getParent().getId().getValue(), obj.getChild().getId().getValue()
                parent = (WORLD.datasets if kind == "dataset" else WORLD.screens).get(pid)
                ann = WORLD.annotations.get(aid)
                if parent is None or ann is None:
                    raise omero.ValidationException(None, None, f"no {kind} {pid} or annotation {aid}")
                if parent["group"] != s["group"] or ann["group"] != s["group"]:
                    raise omero.SecurityViolation(None, None, "cannot link objects of another group")
                if [kind, pid, aid] in WORLD.container_links:
                    # OMERO's unique (parent, child, owner) constraint on annotation links.
                    raise omero.ValidationException(None, None, f"{kind} {pid} is already linked to annotation {aid}")
                WORLD.container_links.append([kind, pid, aid])
                return type(obj)(WORLD.new_id(), False)
            if isinstance(obj, omero.model.OriginalFileI):
                rec = dict(base, id=WORLD.new_id(), name=unwrap(obj.getName()), client_path=unwrap(obj.getPath()),
                           declared_size=unwrap(obj.getSize()), size=0, sha1=hashlib.sha1(), sequential=True,
                           created=False, hash=None)
                rec["path"] = os.path.join(DOUBLE.workdir, "Files", str(rec["id"]))
                WORLD.original_files[rec["id"]] = rec
                out = omero.model.OriginalFileI(rec["id"], True)
                out.setName(rstring(rec["name"]))
                return out
        raise omero.ApiUsageException(None, None, f"the double cannot save {type(obj).__name__}")

    def _check_link(self, obj, s, pending=()):
        """Refuse an image-annotation link as OMERO would; returns (image id, annotation id)."""
        iid, aid = obj.getParent().getId().getValue(), obj.getChild().getId().getValue()
        image, ann = WORLD.images.get(iid), WORLD.annotations.get(aid)
        if image is None or ann is None:
            raise omero.ValidationException(None, None, f"no image {iid} or annotation {aid}")
        if image["group"] != s["group"] or ann["group"] != s["group"]:
            raise omero.SecurityViolation(None, None, "cannot link objects of another group")
        if not can_link_annotation(ann, s):
            raise omero.SecurityViolation(None, None, f"cannot link annotation {aid}: not permitted")
        if iid in ann["images"] or (iid, aid) in pending:
            raise omero.ValidationException(None, None, f"image {iid} is already linked to annotation {aid}")
        return iid, aid

    @amd
    def saveAndReturnObject(self, obj, current=None):
        return self._save(obj, session_of(current))

    @amd
    def saveAndReturnArray(self, objs, current=None):
        # One transaction, as on a real server: every link is checked before anything is saved.
        s = session_of(current)
        with WORLD.lock:
            pending = set()
            for o in objs:
                if isinstance(o, omero.model.ImageAnnotationLinkI):
                    pending.add(self._check_link(o, s, pending))
            return [self._save(o, s) for o in objs]


@strict
class SharedResourcesI(omero.grid.SharedResources):
    def repositories(self, current=None):
        desc = omero.model.OriginalFileI(1, True)
        desc.setName(rstring("ManagedRepository"))
        desc.setPath(rstring("/"))
        prx = typed(omero.grid.ManagedRepositoryPrx, current, "ManagedRepository")
        return omero.grid.RepositoryMap(descriptions=[desc], proxies=[prx])


@strict
class ManagedRepositoryI(omero.grid.ManagedRepository):
    def importFileset(self, fileset, settings, current=None):
        s = session_of(current)
        target = settings.userSpecifiedTarget
        with WORLD.lock:
            if target is not None:
                kind = "dataset" if isinstance(target, omero.model.DatasetI) else "screen"
                table = WORLD.datasets if kind == "dataset" else WORLD.screens
                rec = table.get(target.getId().getValue())
                if rec is None:
                    raise omero.ValidationException(None, None, f"no {kind} {target.getId().getValue()}")
                if rec["group"] != s["group"]:
                    raise omero.SecurityViolation(
                        None, None, f"Target container in group: {rec['group']}, not current group: {s['group']}")
                target = (kind, rec["id"])
            version = []
            for link in fileset.copyJobLinks():
                version += [(nv.name, nv.value) for nv in link.getChild().getVersionInfo() or []]
            fs = {"id": WORLD.new_id(), "owner": s["user"], "group": s["group"], "state": "uploading",
                  "session": s["uuid"],
                  "client_paths": [unwrap(e.getClientPath()) for e in fileset.copyUsedFiles()],
                  "version_info": version, "target": target, "images": [], "files": [],
                  "name": unwrap(settings.userSpecifiedName), "description": unwrap(settings.userSpecifiedDescription)}
            # Each upload lands in the managed repository under the fileset's own folder,
            # keeping the client's relative layout (Bio-Formats finds companions by name).
            folder = os.path.join(DOUBLE.workdir, "ManagedRepository", str(fs["id"]))
            common = os.path.commonpath([p.lstrip("/") for p in fs["client_paths"]]) if fs["client_paths"] else ""
            if len(fs["client_paths"]) == 1:
                common = os.path.dirname(fs["client_paths"][0].lstrip("/"))
            fs["files"] = [{"size": 0, "sha1": hashlib.sha1(), "sequential": True, "created": False,
                            "path": os.path.join(folder, os.path.relpath(p.lstrip("/"), common))}
                           for p in fs["client_paths"]]
            WORLD.filesets[fs["id"]] = fs
            # Filesets between importFileset and the end of their server-side import: the
            # imports this server is running at once (back-pressure tests read the maximum).
            WORLD.counters["imports_in_progress"] += 1
            WORLD.counters["max_imports_in_progress"] = max(WORLD.counters["max_imports_in_progress"],
                                                            WORLD.counters["imports_in_progress"])
        proc = ImportProcessI(fs["id"])
        return omero.grid.ImportProcessPrx.uncheckedCast(DOUBLE.add_servant(proc, Ice.Identity(str(uuid.uuid4()), "proc"),
                                                                            current))


@strict
class ImportProcessI(omero.grid.ImportProcess):
    def __init__(self, fileset_id):
        self.fileset_id = fileset_id

    def getUploader(self, i, current=None):
        session_of(current)
        fs = WORLD.filesets[self.fileset_id]
        if not 0 <= i < len(fs["files"]):
            raise omero.ApiUsageException(None, None, f"no file {i} in this fileset")
        with WORLD.lock:
            WORLD.counters["uploaders_open"] += 1
            WORLD.counters["max_uploaders_open"] = max(WORLD.counters["max_uploaders_open"],
                                                       WORLD.counters["uploaders_open"])
        store = RawFileStoreI(fs["files"][i], world=WORLD)
        prx = DOUBLE.add_servant(store, Ice.Identity(str(uuid.uuid4()), "rfs"), current)
        return omero.api.RawFileStorePrx.uncheckedCast(prx)

    def verifyUpload(self, hashes, current=None):
        session_of(current)
        with WORLD.lock:
            fs = WORLD.filesets[self.fileset_id]
            missing = [f["path"] for f in fs["files"] if not f["created"]]
            if missing:
                # OMERO creates an uploaded file on its first write; a file never
                # written does not exist, and hashing it fails on the server.
                raise omero.InternalException(
                    None, None, f"java.io.FileNotFoundException: {missing[0]} (No such file or directory)")
            if len(hashes) != len(fs["files"]):
                raise omero.ApiUsageException(
                    None, None, f"{len(hashes)} checksums for a fileset of {len(fs['files'])} files")
            server = [f["sha1"].hexdigest() for f in fs["files"]]
            # As ImportProcessI.verifyUpload: the mismatches by index, not every hash (a plate
            # has 100,000 of them).
            failing = {i: h for i, (c, h) in enumerate(zip(hashes, server, strict=True)) if c != h}
            if failing:
                first = min(failing)
                raise omero.ChecksumValidationException(
                    None, None, f"A checksum mismatch has occurred: {len(failing)} file(s), the first "
                                f"{fs['files'][first]['path']} (client {hashes[first]}, server {server[first]})",
                    failing)
            fs["state"] = "importing"
            fs["files"] = [{"size": f["size"], "sha1": h, "path": f["path"]}
                           for f, h in zip(fs["files"], server, strict=True)]
        handle = HandleI()
        threading.Thread(target=run_import, args=(self.fileset_id, handle), daemon=True).start()
        return DOUBLE.add_handle(handle, current)

    @amd
    def close(self, current=None):
        return _NOTHING


class ServerBioFormats:
    """The server side's Bio-Formats: the same jar as the child's, started on first use.
    Without Java, JPype or the jar the double reads nothing and takes every fileset as
    one single-series, non-plate image (``state()["bioformats"]`` says which)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bf = None
        self.reason = None
        self.checked = False

    def reader(self):
        with self.lock:
            if not self.checked:
                self.checked = True
                import bfgroup

                jar = os.environ.get("WATCHFOLDER_BIOFORMATS_JAR") or None
                self.reason = bfgroup.why_unavailable(jar)
                if self.reason is None:
                    self.bf = bfgroup.BioFormats(jar)
            return self.bf

    def read(self, path):
        bf = self.reader()
        if bf is None:
            return None
        with self.lock:
            # Every plane of every series, as ManagedImportRequestI.pixelData reads them.
            return bf.read(path, pixels="all")


SERVER_BF = ServerBioFormats()


def _err(handle, fs, name, message):
    fs["state"] = "failed"
    handle.finish(omero.cmd.ERR(category="::omero::grid::ImportRequest", name=name,
                                parameters={"message": message}), failure=True)


def run_import(fileset_id, handle):
    world = WORLD  # a /reset meanwhile must not touch the next test's counters
    try:
        _run_import(fileset_id, handle)
    finally:
        with world.lock:
            world.counters["imports_in_progress"] -= 1


def _run_import(fileset_id, handle):
    """The server-side import, as ManagedImportRequestI runs it: Bio-Formats reads the
    uploaded fileset (its first file); a file it cannot read fails the import with
    Bio-Formats' reason; each series becomes an image ("name [series]" when several);
    a plate becomes a Plate, and only plates are linked to a Screen target (images of
    a non-plate fileset imported "into a screen" end up orphaned). The import runs in
    the importing session: one that timed out meanwhile fails it. Closing the handle
    cancels it."""
    delay = WORLD.faults.get("import_delay")
    if delay and handle.cancelled.wait(float(delay)):
        pass
    with WORLD.lock:
        fs = WORLD.filesets.get(fileset_id)
        if fs is None or fs["state"] == "deleted":
            return
        if handle.cancelled.is_set():
            fs["state"] = "cancelled"
            WORLD.counters["cancelled_imports"] += 1
            return
        WORLD.counters["imports"] += 1
        if not session_alive(fs["session"]):
            ended = WORLD.sessions[fs["session"]]["ended_by"] or "closed"
            return _err(handle, fs, "session-lost", f"the importing session ended: {ended}")
        error = WORLD.faults.get("import_error")
        if error:
            return _err(handle, fs, "import-failed", str(error))
        main = fs["files"][0]["path"]
    reading = SERVER_BF.read(main)
    with WORLD.lock:
        if reading is not None and reading.error:
            return _err(handle, fs, "import-failed", f"Bio-Formats cannot read {os.path.basename(main)}: "
                                                     f"{reading.error}")
        series = reading.series if reading else 1
        plates = reading.plates if reading else 0
        base = fs["name"] or os.path.basename(fs["client_paths"][0])
        kind, target = fs["target"] or (None, None)
        plate = None
        if plates:
            plate = {"id": WORLD.new_id(), "name": base, "screen": target if kind == "screen" else None,
                     "owner": fs["owner"], "group": fs["group"], "fileset": fileset_id}
            WORLD.plates[plate["id"]] = plate
        images = []
        for i in range(series):
            label = (reading.image_names[i] if reading and reading.image_names[i] else str(i)) if series > 1 else ""
            image = {"id": WORLD.new_id(), "name": f"{base} [{label}]" if label else base,
                     "description": fs["description"], "fileset": fileset_id, "owner": fs["owner"],
                     "group": fs["group"], "plate": plate["id"] if plate else None,
                     # Only a non-plate image goes into a Dataset target; nothing goes into a screen but a plate.
                     "dataset": target if kind == "dataset" and not plate else None}
            WORLD.images[image["id"]] = image
            images.append(image)
        fs["images"] = [i["id"] for i in images]
        fs["state"] = "imported"
    pixels = []
    for image in images:
        img = omero.model.ImageI(image["id"], True)
        img.setName(rstring(image["name"]))
        img.setFileset(omero.model.FilesetI(fileset_id, False))
        px = omero.model.PixelsI(WORLD.new_id(), True)
        px.setImage(img)
        px.setSizeX(rint(1))
        pixels.append(px)
    objects = [omero.model.FilesetI(fileset_id, False)]
    if plate:
        objects.append(omero.model.PlateI(plate["id"], False))
    handle.finish(omero.grid.ImportResponse(pixels=pixels, objects=objects))


@strict
class RawFileStoreI(omero.api.RawFileStore):
    """An upload target that writes positionally, as OMERO's RawFileBean does.

    Writes may be dispatched out of order (a client keeps several in flight and
    the thread pool is not serialized), so a block that lands ahead of the bytes
    received so far waits in ``ahead`` until the gap before it is filled; the
    running SHA-1 then covers the file in order. ``ahead`` holds at most the
    client's writes in flight.

    Closing it ends the service, as closing any of OMERO's stateful services does:
    its servant goes (a fileset of 100,000 files leaves none behind), and a call
    after close finds no object.
    """

    def __init__(self, record=None, world=None):
        self.record = record  # None until setFileId (a store from createRawFileStore)
        self.world = world  # the World whose uploaders_open counts this one (from getUploader)
        self.ahead = {}
        self.in_flight = 0
        self.later_written = threading.Event()  # a block past offset 0 has been written

    def write_async(self, _cb, buf, position, length, current=None):
        try:
            session_of(current)
            with WORLD.lock:
                self.in_flight += 1
                # Either proves the client kept several writes in flight: another is being
                # dispatched now, or an earlier block was sent and has not arrived yet (the
                # thread pool may dispatch a later block first, and finish it first).
                if self.in_flight > 1 or position > self.record["size"]:
                    WORLD.counters["overlapped_writes"] += 1
                hold = WORLD.faults.get("hold_first_write") if position == 0 else None
            try:
                if hold:
                    # Keep the first block back until a later one has been written
                    # (or the deadline passes): out of order, as a real server's
                    # thread pool may well do it to writes kept in flight.
                    self.later_written.wait(float(hold))
                slow = WORLD.faults.get("slow")
                if slow:
                    time.sleep(float(slow))
                with WORLD.lock:
                    drop = WORLD.faults.get("drop_after_bytes")
                    if drop is not None and WORLD.counters["bytes_written"] + length > int(drop):
                        WORLD.faults.pop("drop_after_bytes")
                        WORLD.counters["drops"] += 1
                        current.con.close(True)
                        # The dispatch must still end: an AMD call never answered stays
                        # outstanding, and the adapter's destroy (the "down" fault) waits
                        # for it for ever. The answer goes nowhere: the connection is gone.
                        _cb.ice_exception(Ice.ConnectionLostException())
                        return
                    fail = WORLD.faults.get("fail_upload")
                    if fail is not None and os.path.basename(self.record.get("path") or "") == fail:
                        WORLD.faults.pop("fail_upload")
                        raise omero.ResourceError(None, None, "java.io.IOException: No space left on device")
                    self._put(bytes(buf[:length]), position)
                    WORLD.counters["bytes_written"] += length
                    WORLD.counters["writes"] += 1
                if position > 0:
                    self.later_written.set()
            finally:
                with WORLD.lock:
                    self.in_flight -= 1
            _cb.ice_response()
        except Exception as exc:  # noqa: BLE001
            _cb.ice_exception(exc)

    def _put(self, data, position):
        rec = self.record
        # The file exists from the first write on, an empty one included (FileBuffer).
        path = rec.get("path")
        if path:
            if not rec.get("created"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            # The first write creates the file (FileBuffer): a path left by an earlier world (ids
            # start again after /reset) must not lend it its old bytes; OMERO never reuses one.
            with open(path, "r+b" if rec.get("created") and os.path.exists(path) else "wb") as f:
                f.seek(position)
                f.write(data)
        rec["created"] = True
        if not data:
            return
        if position > rec["size"]:
            self.ahead[position] = data
            WORLD.counters["out_of_order_writes"] += 1
            return
        if position < rec["size"]:
            rec["sequential"] = False  # a rewrite: noted, not applied (each byte is hashed as first written)
            return
        rec["sha1"].update(data)
        rec["size"] += len(data)
        while rec["size"] in self.ahead:
            data = self.ahead.pop(rec["size"])
            rec["sha1"].update(data)
            rec["size"] += len(data)

    @amd
    def close(self, current=None):
        if current is not None:
            DOUBLE.remove_servant(current.id)
        if self.world is not None:
            with self.world.lock:
                self.world.counters["uploaders_open"] -= 1
            self.world = None  # a second close counts nothing
        return _NOTHING

    @amd
    def size(self, current=None):
        return self.record["size"]

    @amd
    def setFileId(self, fid, current=None):
        s = session_of(current)
        with WORLD.lock:
            rec = WORLD.original_files.get(fid)
            if rec is None or rec["group"] != s["group"]:
                raise omero.SecurityViolation(None, None, f"Cannot read ome.model.core.OriginalFile:Id_{fid}")
            self.record = rec
        return _NOTHING

    @amd
    def save(self, current=None):
        session_of(current)
        with WORLD.lock:
            rec = self.record
            # As RawFileBean.save: the hash and size of the file as it is on disk now (a
            # rewrite of an upload cut short included).
            path = rec.get("path")
            if path and os.path.exists(path):
                digest = hashlib.sha1()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                rec["hash"] = digest.hexdigest()
                rec["size"] = os.path.getsize(path)
            else:
                rec["hash"] = rec["sha1"].hexdigest()
            out = omero.model.OriginalFileI(rec["id"], True)
            out.setSize(rlong(rec["size"]))
            out.setHash(rstring(rec["hash"]))
            return out


@strict
class HandleI(omero.cmd.Handle):
    def __init__(self):
        self.lock = threading.Lock()
        self.response = None
        self.status = None
        self.callbacks = []
        self.cancelled = threading.Event()

    def finish(self, response, failure=False):
        status = omero.cmd.Status(flags=[omero.cmd.State.FAILURE] if failure else [], currentStep=1, steps=1)
        with self.lock:
            self.response, self.status = response, status
            callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:
            self._notify(cb)

    def _notify(self, cb):
        try:
            cb.begin_finished(self.response, self.status)
        except Ice.Exception:
            pass  # the client went away; it polls getResponse when it comes back

    def addCallback(self, cb, current=None):
        # Answer over the client's own connection, as Glacier2 does.
        fixed = omero.cmd.CmdCallbackPrx.uncheckedCast(current.con.createProxy(cb.ice_getIdentity()))
        with self.lock:
            done = self.response is not None
            if not done:
                self.callbacks.append(fixed)
        if done:
            self._notify(fixed)

    def removeCallback(self, cb, current=None):
        pass

    def getResponse(self, current=None):
        return self.response

    def getStatus(self, current=None):
        return self.status

    def cancel(self, current=None):
        with self.lock:
            if self.response is not None:
                return False
        self.cancelled.set()
        return True

    def close(self, current=None):
        # Closing a handle whose command still runs cancels it (omero.cmd.Handle.close).
        with self.lock:
            running = self.response is None
        if running:
            self.cancelled.set()


# ---------------------------------------------------------------------------
# The server


class Double:
    def __init__(self, workdir):
        self.workdir = workdir
        cert, key = self._certificate()
        init = Ice.InitializationData()
        init.properties = Ice.createProperties()
        for k, v in {
            "Ice.ThreadPool.Server.Size": "4", "Ice.ThreadPool.Server.SizeMax": "16",
            "Ice.ThreadPool.Client.Size": "2", "Ice.MessageSizeMax": "250000",
            "Ice.Plugin.IceSSL": "IceSSL:createIceSSL", "IceSSL.CertFile": cert, "IceSSL.KeyFile": key,
            "IceSSL.VerifyPeer": "0", "Ice.Warn.Connections": "0", "Ice.ACM.Server.Timeout": "0",
        }.items():
            init.properties.setProperty(k, v)
        self.ic = Ice.initialize(init)
        ofr.registerObjectFactory(self.ic, None)
        for factory in ObjectFactories.values():
            factory.register(self.ic)
        self.servants = {}
        self.adapter = None
        self.port = 0
        self.generation = 0
        for name, servant in (("IAdmin", AdminI()), ("ISession", SessionServiceI()), ("IQuery", QueryI()),
                              ("IUpdate", UpdateI()), ("IConfig", ConfigI()),
                              ("SharedResources", SharedResourcesI()),
                              ("ManagedRepository", ManagedRepositoryI())):
            self.servants[("svc", name)] = servant
        self.servants[("OMERO.Glacier2", "router")] = RouterI()
        self.base = set(self.servants)
        self.up()

    def _certificate(self):
        cert, key = os.path.join(self.workdir, "cert.pem"), os.path.join(self.workdir, "key.pem")
        if not os.path.exists(cert):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                            "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1"],
                           check=True, capture_output=True)
        return cert, key

    def up(self):
        with WORLD.lock:
            if self.adapter is not None:
                return
            self.generation += 1
            adapter = self.ic.createObjectAdapterWithEndpoints(
                f"Double{self.generation}", f"ssl -h 127.0.0.1 -p {self.port}")
            for (category, name), servant in self.servants.items():
                adapter.add(servant, Ice.Identity(name, category))
            adapter.activate()
            self.port = adapter.getEndpoints()[0].getInfo().port
            self.adapter = adapter

    def down(self):
        with WORLD.lock:
            adapter, self.adapter = self.adapter, None
            WORLD.connections.clear()
        if adapter is not None:
            adapter.destroy()

    def reset(self):
        """Forget every servant made for earlier sessions (sessions, uploads, handles)."""
        self.up()
        with WORLD.lock:
            for key in [k for k in self.servants if k not in self.base]:
                servant_identity = Ice.Identity(key[1], key[0])
                del self.servants[key]
                if self.adapter.find(servant_identity) is not None:
                    self.adapter.remove(servant_identity)

    def add_servant(self, servant, identity, current=None):
        with WORLD.lock:
            self.servants[(identity.category, identity.name)] = servant
            if self.adapter is not None and self.adapter.find(identity) is None:
                self.adapter.add(servant, identity)
            return (current.adapter if current else self.adapter).createProxy(identity)

    def remove_servant(self, identity):
        """Forget a servant whose service was closed (the uploads of a plate would pile up)."""
        with WORLD.lock:
            self.servants.pop((identity.category, identity.name), None)
            if self.adapter is not None and self.adapter.find(identity) is not None:
                self.adapter.remove(identity)

    def add_handle(self, handle, current):
        prx = self.add_servant(handle, Ice.Identity(str(uuid.uuid4()), "handle"), current)
        return omero.cmd.HandlePrx.uncheckedCast(prx)


DOUBLE = None


# The switches POST /faults takes (see the module docstring).
FAULTS = ("down", "slow", "drop_after_bytes", "import_error", "import_delay", "session_defaults",
          "hold_first_write", "fail_upload")


class Control(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, data, code=200):
        body = json.dumps(data, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/state":
            return self._answer(WORLD.dump())
        self._answer({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path == "/reset":
            # A fresh world for the next test, in the same process (its JVM and TLS set-up
            # are kept): every session, object and fault of the last one is gone.
            global WORLD
            with WORLD.lock:
                WORLD.faults.clear()
                WORLD = World()
            DOUBLE.reset()
            # Fileset ids start again: the last world's uploads go with it.
            shutil.rmtree(os.path.join(DOUBLE.workdir, "ManagedRepository"), ignore_errors=True)
            return self._answer({"ok": True, "port": DOUBLE.port})
        if self.path == "/seed":
            for g in body.get("groups", []):
                WORLD.add_group(g["name"], g.get("perms", "rw----"))
            for u in body.get("users", []):
                WORLD.add_user(u["name"], u.get("password", "secret"), u.get("email"), u.get("groups", []),
                               u.get("admin", False), privileges=u.get("privileges"),
                               owner_of=u.get("owner_of", ()))
            return self._answer({"ok": True})
        if self.path == "/session":
            # A session the way a web client would hold one (for session-key jobs).
            with WORLD.lock:
                user = WORLD.users[body["user"]]
                group = WORLD.groups[body["group"]] if body.get("group") else WORLD.group_by_id(
                    next(g for g in user["groups"] if g != 1))
                return self._answer({"uuid": WORLD.new_session(user, group)["uuid"]})
        if self.path == "/annotations":
            # An annotation that exists before the import: {"owner", "group", "kind", "ns", "text"} -> {"id"}.
            with WORLD.lock:
                rec = {"id": WORLD.new_id(), "kind": body.get("kind", "tag"), "ns": body.get("ns"),
                       "text": body.get("text", ""), "owner": WORLD.users[body["owner"]]["id"],
                       "group": WORLD.groups[body["group"]]["id"], "images": []}
                WORLD.annotations[rec["id"]] = rec
            return self._answer({"id": rec["id"]})
        if self.path == "/session/close":
            # The session a client lent us ends (logout, or the server's idle timeout).
            with WORLD.lock:
                WORLD.sessions[body["uuid"]]["closed"] = True
            return self._answer({"ok": True})
        if self.path == "/faults":
            unknown = sorted(set(body) - set(FAULTS))
            if unknown:
                # A misspelt switch would otherwise do nothing, silently.
                return self._answer({"error": f"unknown fault(s) {unknown}", "known": sorted(FAULTS)}, 400)
            with WORLD.lock:
                for k, v in body.items():
                    if v is None:
                        WORLD.faults.pop(k, None)
                    else:
                        WORLD.faults[k] = v
                down = WORLD.faults.get("down")
            DOUBLE.down() if down else DOUBLE.up()
            return self._answer({"ok": True, "faults": WORLD.faults, "port": DOUBLE.port})
        self._answer({"error": "not found"}, 404)


def main():
    global DOUBLE
    workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="omero-double-")
    DOUBLE = Double(workdir)
    control = ThreadingHTTPServer(("127.0.0.1", 0), Control)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(json.dumps({"port": DOUBLE.port, "control": control.server_address[1]}), flush=True)
    sys.stdin.read()  # until the test closes our stdin (or dies)
    # No orderly Ice shutdown: it would wait for dispatches a "slow" fault keeps asleep.
    os._exit(0)


if __name__ == "__main__":
    main()
