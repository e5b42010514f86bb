"""What the mails say: composing owner, admin and watcher mails from templates.

:class:`Notifier` turns a finished job into :class:`~watchfolder.mail.Mail`
objects. It runs inside the store's finishing transaction, so it is pure and
fast: templates are read and checked once, at construction; composing touches
no network and no database (it reads only the tail of the job's log file, for
the admin).

Templates
---------
Each mail kind has a plain-text template ``<kind>.txt`` and an HTML template
``<kind>.html``; the defaults live in ``watchfolder/templates/``. A file of the
same name in ``notify.templates_dir`` replaces the default, file by file. The
kinds are ``job_succeeded``, ``job_failed``, ``job_cancelled`` (owner mails),
``admin_failure`` and ``watcher_unhealthy`` (admin mails).

Templates use :class:`string.Template` syntax: ``$name`` or ``${name}``, and
``$$`` for a literal dollar sign. The first line of a ``.txt`` template is the
subject: ``Subject: Imported: $acquisition``. Every value has its control
characters escaped (a newline in a name shows as ``\\n``), in ``.html``
templates too, where it is also HTML-escaped; the *block* variables (listed in
:data:`BLOCKS`) are given as ready-made HTML fragments there (built from values
escaped the same way) and as text paragraphs (ending with a blank line, or
empty) in ``.txt`` templates. A template naming a variable its
kind does not offer (see :data:`VARIABLES`) is refused at start with a
:class:`~watchfolder.errors.ConfigError` naming the file and the variable.

Recipients of the owner mail: the job's ``email``, else the owner's address
from OMERO (``result["owner_email"]``, or ``spec.extra["owner_email"]`` kept
by the importer as soon as it knew it, for a failure), else ``owner@notify.default_domain``,
else the admin with a note that the owner has no address; with no admin
either, no owner mail is composed and a warning is logged. A permanently
failed job also gets an ``admin_failure`` mail to the admin. A cancelled job
gets a short ``job_cancelled`` mail to the owner and none to the admin (an
admin or the submitting client cancelled it, so they know).
"""

from __future__ import annotations

import difflib
import hashlib
import html
import logging
import os
import random
import re
import string
import time
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..job import Job, JobState, printable, reason_group
from ..units import format_size
from .headers import MAIL_POLICY
from .message import Mail

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES_DIR = Path(__file__).parent / "templates"

#: Lines of the job log quoted in the admin mail.
LOG_TAIL_LINES = 50
#: Bytes read from the end of the job log to find those lines.
LOG_TAIL_BYTES = 64 * 1024
#: Files and images listed by name in a mail; the rest are counted.
MAX_LISTED = 20

_JOB = (
    "job_id", "owner", "group", "acquisition", "folder", "source", "target", "state",
    "created", "started", "finished", "attempts", "contact", "subject",
    "summary", "file_count", "total_size", "files", "note", "about",
)
#: The variables each mail kind offers to its templates.
VARIABLES: dict[str, frozenset[str]] = {
    "job_succeeded": frozenset(
        _JOB + ("imported_into", "image_count", "images", "location", "duration", "total_time")
    ),
    "job_failed": frozenset(_JOB + ("reason", "advice", "error_kind")),
    "job_cancelled": frozenset(_JOB + ("cancelled_by", "advice")),
    "admin_failure": frozenset(
        _JOB
        + ("reason", "reason_short", "advice", "error_kind", "config_error", "owner_recipients",
           "log_path", "log_tail", "job_url")
    ),
    "watcher_unhealthy": frozenset(
        {"name", "since", "duration", "error", "status", "contact", "subject", "path", "mode"}
    ),
    # Service-level alerts: an importer target paused or resumed, an event sink disabled.
    "admin_alert": frozenset({"title", "what", "advice", "since", "duration", "status", "contact", "subject"}),
    "admin_digest": frozenset({"count", "minutes", "threshold", "failures", "contact", "subject"}),
}
#: Variables that are pre-rendered fragments: HTML in .html templates, text paragraphs in .txt.
BLOCKS = frozenset({"note", "files", "images", "location", "log_tail", "status", "job_url", "about", "failures"})

KINDS = tuple(VARIABLES)
SUBJECT_PREFIX = "Subject:"


@dataclass(frozen=True)
class _Block:
    text: str
    html: str


@dataclass(frozen=True)
class _Templates:
    subject: string.Template
    text: string.Template
    html: string.Template


#: Set on an owner's mail sent to the admin because the owner has no address (see
#: :func:`admin_bound`): the admin digest takes it like an admin failure mail.
REDIRECT_HEADER = "X-Watchfolder-Redirected"


def admin_bound(mail: Any) -> bool:
    """An outbox mail that tells the admin about a failure: ``admin_failure``, or an owner's
    failure mail redirected to the admin (unknown owner or no address)."""
    if mail.kind == "admin_failure":
        return True
    if mail.kind != "job_failed":
        return False
    return BytesHeaderParser().parsebytes(mail.raw).get(REDIRECT_HEADER) == "admin"


class Notifier:
    """Composes the mails of finished jobs and of unhealthy watchers (see the module doc)."""

    def __init__(self, config: Any):
        self.notify = config.notify
        self.web_url = (config.importer.omero.web_url or "").rstrip("/") or None
        self.importer_kind = config.importer.kind
        server = getattr(config, "server", None)
        public_url = getattr(server, "public_url", None)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.sender = self.notify.sender
        self.domain = self.sender.rpartition("@")[2] or "watchfolder.localhost"
        self.contact = self.notify.contact or self.notify.admin_email or "your facility's data administrator"
        self.templates = load_templates(self.notify.templates_dir)

    # ------------------------------------------------------------------ jobs

    def compose(self, job: Job) -> list[Mail]:
        """The mails for a job in its final state: the owner's, plus the admin's on failure.

        Never raises: a mail that cannot be composed is logged and left out,
        because this runs inside the transaction that finishes the job.
        """
        if job.state == JobState.SUCCEEDED:
            kinds = ["job_succeeded"]
        elif job.state == JobState.FAILED:
            kinds = ["job_failed", "admin_failure"]
        elif job.state == JobState.CANCELLED:
            kinds = ["job_cancelled"]
        else:
            log.warning("job %s is %s, not finished; no mail composed", job.id, job.state)
            return []
        mails = []
        for kind in kinds:
            try:
                mail = self._compose_job(kind, job)
            except Exception:
                log.exception("cannot compose the %s mail of job %s; it is not sent", kind, job.id)
                continue
            if mail is not None:
                mails.append(mail)
        return mails

    def owner_recipients(self, job: Job) -> tuple[tuple[str, ...], str]:
        """Where the owner mail goes, and a note to put in it when it goes to the admin instead."""
        # The OMERO importer keeps the owner's OMERO address in spec.extra as soon as it knows
        # it, so a failure mail reaches the owner too (a result exists only on success).
        for address in (job.spec.email, (job.result or {}).get("owner_email"), job.spec.extra.get("owner_email")):
            if _is_address(address):
                return (address.strip(),), ""
        if self.notify.default_domain and re.fullmatch(r"[A-Za-z0-9._%+-]+", job.spec.owner or ""):
            return (f"{job.spec.owner}@{self.notify.default_domain}",), ""
        if self.notify.admin_email:
            owner = job.spec.owner
            if not owner:
                note = ("This mail was meant for the owner, but the acquisition names none: it is sent to you, "
                        "the admin, instead. Nobody else can be told until its sidecar or manifest gives an "
                        "\"owner\" (or the watch folder sets one).")
            elif self.notify.default_domain:
                note = (f"This mail was meant for the owner {owner}, who has no known email address: it is sent "
                        f"to you, the admin, instead. Please forward it. {owner!r} cannot be a mailbox name at "
                        f"notify.default_domain ({self.notify.default_domain}); give an email in the sidecar or "
                        f"manifest, or set it in OMERO.")
            else:
                note = (f"This mail was meant for the owner {owner}, who has no known email address: it is sent "
                        f"to you, the admin, instead. Please forward it. To reach owners directly, give an email "
                        f"in the sidecar or manifest, set it in OMERO, or set notify.default_domain.")
            return (self.notify.admin_email,), note
        return (), ""

    def _compose_job(self, kind: str, job: Job) -> Mail | None:
        owner_to, note = self.owner_recipients(job)
        if kind == "admin_failure":
            if not self.notify.admin_email:
                return None
            recipients: tuple[str, ...] = (self.notify.admin_email,)
            note = ""
        else:
            if not owner_to:
                log.warning(
                    "job %s: owner %r has no email address and notify.admin_email is not set; "
                    "no %s mail is sent. Set notify.admin_email or notify.default_domain.",
                    job.id, job.spec.owner, kind,
                )
                return None
            recipients = owner_to
        duplicate = (job.result or {}).get("duplicate_of") if job.state == JobState.SUCCEEDED else None
        if duplicate and kind != "admin_failure":
            note = (f"These files were already imported as job {duplicate} (same names, sizes and SHA-256): "
                    "nothing was imported again. " + note).strip()
        values = self._job_values(kind, job, owner_to, note)
        stamp = job.finished_at if job.finished_at is not None else time.time()
        digest = hashlib.sha256(job.idempotency_key.encode()).hexdigest()[:12]
        message_id = f"<watchfolder.job{job.id}.{kind}.{int(stamp * 1000)}.{digest}@{self.domain}>"
        # An owner's failure mail that goes to the admin is an admin failure mail too (the digest takes it).
        for_admin = kind == "job_failed" and bool(note) and recipients == (self.notify.admin_email,)
        return self._mail(kind, recipients, values, message_id, stamp, job_id=job.id, for_admin=for_admin)

    def _job_values(self, kind: str, job: Job, owner_to: tuple[str, ...], note: str) -> dict[str, Any]:
        spec = job.spec
        result = job.result or {}
        sizes = _file_sizes(job)
        total = result.get("bytes") if isinstance(result.get("bytes"), int) else sum(s or 0 for _, s in sizes)
        values: dict[str, Any] = {
            "job_id": str(job.id),
            "owner": spec.owner or "(unknown owner)",
            "group": spec.group or "default",
            "acquisition": _acquisition_name(job),
            "folder": spec.root,
            "source": spec.source,
            "target": spec.target.label or "(none)",
            "state": str(job.state),
            "created": _when(job.created_at),
            "started": _when(job.started_at),
            "finished": _when(job.finished_at),
            "attempts": str(job.attempts),
            "contact": self.contact,
            "file_count": str(len(sizes)),
            "total_size": _size(total),
            "files": _with_left_out(_files_block(sizes), spec.extra.get("left_out")),
            "about": _about_block(spec.description, spec.annotations),
            "note": _Block(_lines(note) + "\n\n", f'<p style="background: #fff3cd; padding: 0.5em;">{_esc(note)}</p>\n')
            if note
            else _Block("", ""),
        }
        images = [i for i in result.get("image_ids") or [] if isinstance(i, int)]
        in_omero = "image_ids" in result or "fileset_ids" in result
        summary = [_plural(len(sizes), "file"), _size(total)]
        if in_omero:
            summary.append(_plural(len(images), "image"))
        values["summary"] = ", ".join(summary)
        error = job.error
        reason = error.message if error else "no reason was recorded"
        if kind == "job_succeeded":
            values.update(
                imported_into="OMERO" if in_omero else self._destination_name(job),
                image_count=str(len(images)),
                images=self._images_block(images) if in_omero else _Block("", ""),
                location=self._location(job, result),
                duration=_duration(job.started_at, job.finished_at),
                total_time=_duration(job.created_at, job.finished_at),
            )
        if kind in ("job_failed", "admin_failure"):
            values.update(reason=reason, advice=self._advice(job), error_kind=str(error.kind) if error else "unknown")
        if kind == "job_cancelled":
            values["cancelled_by"] = _cancelled_by(job)
            values["advice"] = f"ask {self.contact} to retry job {job.id}"
        if kind == "admin_failure":
            values.update(
                reason_short=_one_line(reason, 80),
                config_error=", caused by the service's configuration" if error and error.config_error else "",
                owner_recipients=", ".join(owner_to) if owner_to else "nobody (no address known)",
                log_path=job.log_path or "(none)",
                log_tail=_log_tail(job.log_path),
                job_url=self._job_url_block(job),
            )
        return values

    def _destination_name(self, job: Job) -> str:
        kind = job.spec.importer or self.importer_kind
        return {"archive": "the archive", "omero": "OMERO"}.get(kind, kind)

    def _location(self, job: Job, result: dict) -> _Block:
        label = job.spec.target.label or "(no target)"
        if "destination" in result:
            dest = str(result["destination"])
            return _Block(_lines(f"{dest} ({label})"), f"<code>{_esc(dest)}</code> ({_esc(label)})")
        link = None
        if self.web_url:
            for key, kind in (("dataset_id", "dataset"), ("screen_id", "screen")):
                if isinstance(result.get(key), int):
                    link = f"{self.web_url}/webclient/?show={kind}-{result[key]}"
                    break
        if link:
            return _Block(_lines(f"{label} in OMERO, {link}"), f'<a href="{_esc(link)}">{_esc(label)}</a> in OMERO')
        return _Block(_lines(f"{label} in OMERO" if "image_ids" in result else label), _esc(label))

    def _images_block(self, images: list[int]) -> _Block:
        if not images:
            return _Block("", "")
        rows = []
        for image_id in images[:MAX_LISTED]:
            if self.web_url:
                url = f"{self.web_url}/webclient/?show=image-{image_id}"
                rows.append((f"image {image_id}: {url}", f'<a href="{_esc(url)}">image {image_id}</a>'))
            else:
                rows.append((f"image {image_id}", f"image {image_id}"))
        return _list_block("Images", rows, len(images))

    def _job_url_block(self, job: Job) -> _Block:
        if not self.public_url:
            return _Block("", "")
        url = f"{self.public_url}/api/v1/jobs/{job.id}"
        return _Block(_lines(f"Details:     {url}") + "\n", f'<p>Details: <a href="{_esc(url)}">{_esc(url)}</a></p>\n')

    def _advice(self, job: Job) -> str:
        error = job.error
        where = job.spec.root
        if error is not None and error.config_error:
            return (
                "nothing is wrong with your data: the import failed because of a problem in the "
                "import service's setup. The admin has been told; once it is fixed the job can be "
                f"retried, and your files stay where they are ({where})."
            )
        if error is not None and str(error.kind) == "transient":
            return (
                f"the import failed {_plural(job.attempts, 'time')} for a reason that is usually "
                f"temporary (a server out of reach, a timeout). Your files are untouched in {where}. "
                f"Ask {self.contact} to retry job {job.id} once the problem is solved."
            )
        if job.spec.source.startswith("api:"):
            return "correct the request as the reason says and submit it again."
        if job.attempts == 0:
            return (
                "the acquisition was not accepted. Correct what the reason names (the sidecar or "
                f"manifest, or the files) in {where} and save it again; your files were left where they are."
            )
        return (
            "importing the same files again would fail the same way. Correct what the reason names "
            f"(the files, or the sidecar or manifest) and drop the acquisition again, or ask {self.contact} "
            f"for help. Your files were left in {where}."
        )

    # --------------------------------------------------------------- watchers

    def compose_watcher_alert(
        self, name: str, status: dict, since: float, *, now: float | None = None
    ) -> list[Mail]:
        """The admin's mail about a watch folder unhealthy since ``since`` (empty without an admin)."""
        if not self.notify.admin_email:
            log.warning("watch folder %r is unhealthy but notify.admin_email is not set; no mail sent", name)
            return []
        now = time.time() if now is None else now
        values = {
            "name": name,
            "since": _when(since),
            "duration": _format_seconds(max(0.0, now - since)),
            "error": str(status.get("error") or status.get("message") or "not reported by the watcher"),
            "status": _status_block(status),
            "contact": self.contact,
            "path": str(status.get("path", "")),
            "mode": str(status.get("mode", "")),
        }
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        message_id = f"<watchfolder.watcher.{digest}.{int(since * 1000)}@{self.domain}>"
        return [self._mail("watcher_unhealthy", (self.notify.admin_email,), values, message_id, now)]

    def compose_admin_alert(
        self, key: str, title: str, what: str, advice: str, status: dict, since: float,
        *, now: float | None = None,
    ) -> list[Mail]:
        """An admin mail about the service itself (empty without ``notify.admin_email``).

        ``key`` names the occurrence (its Message-ID), so the same alert is recognisable.
        """
        if not self.notify.admin_email:
            log.warning("%s; notify.admin_email is not set, so no mail was sent", title)
            return []
        now = time.time() if now is None else now
        values = {
            "title": title,
            "what": what,
            "advice": advice,
            "since": _when(since),
            "duration": _format_seconds(max(0.0, now - since)),
            "status": _status_block(status),
            "contact": self.contact,
        }
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return [self._mail("admin_alert", (self.notify.admin_email,), values,
                           f"<watchfolder.alert.{digest}@{self.domain}>", now)]

    # --------------------------------------------------------------- digests

    def compose_admin_digest(self, failures: list[tuple[int | None, str]], *, now: float | None = None) -> Mail | None:
        """One admin mail for many permanent failures: ``failures`` are ``(job id, reason)``, grouped by reason.

        None without an admin address.
        """
        if not self.notify.admin_email or not failures:
            return None
        now = time.time() if now is None else now
        # Grouped as the dashboard's "failures by reason": alike reasons naming other files are one line.
        groups: dict[str, list[int | None]] = {}
        examples: dict[str, str] = {}
        for job_id, reason in failures:
            key = reason_group(reason)
            groups.setdefault(key, []).append(job_id)
            examples.setdefault(key, printable(reason))  # a newline in a name must not break the line
        text, rich = [], []
        for key, ids in sorted(groups.items(), key=lambda g: -len(g[1])):
            reason = examples[key] + (" (and alike)" if len({*ids}) > 1 and _alike(failures, key) else "")
            shown = ", ".join(str(i) for i in ids[:MAX_LISTED] if i is not None)
            more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
            text += [f"{len(ids)} x {reason}", f"    jobs {shown}{more}", ""]
            rich.append(f"<li><b>{len(ids)} ×</b> {_esc(reason)}<br><small>jobs {_esc(shown + more)}</small></li>")
        minutes = self.notify.admin_digest_minutes
        values = {
            "count": str(len(failures)),
            "minutes": f"{minutes:g}",
            "threshold": str(self.notify.admin_digest_after),
            "failures": _Block(_lines(*text) + "\n", "<ul>\n" + "\n".join(rich) + "\n</ul>\n"),
            "contact": self.contact,
        }
        ids = ",".join(str(i) for i, _ in failures)
        digest = hashlib.sha256(ids.encode()).hexdigest()[:12]
        message_id = f"<watchfolder.digest.{int(now * 1000)}.{digest}@{self.domain}>"
        return self._mail("admin_digest", (self.notify.admin_email,), values, message_id, now)

    # ------------------------------------------------------------- rendering

    def _mail(
        self,
        kind: str,
        recipients: tuple[str, ...],
        values: dict[str, Any],
        message_id: str,
        stamp: float,
        *,
        job_id: int | None = None,
        for_admin: bool = False,
    ) -> Mail:
        templates = self.templates[kind]
        # Every value is escaped (a name holding a newline cannot break a line: "Where:", the
        # subject, a header); blocks are made of lines escaped by _lines when they were built.
        plain = {k: v.text if isinstance(v, _Block) else printable(str(v)) for k, v in values.items()}
        subject = _one_line(templates.subject.substitute(plain), 200)
        plain["subject"] = subject
        rich = {k: v.html if isinstance(v, _Block) else _esc(str(v)) for k, v in values.items()}
        rich["subject"] = _esc(subject)
        msg = EmailMessage(policy=MAIL_POLICY)
        # Names and addresses go through the policy's header classes (headers.py: kept as given,
        # encoded and folded when they must be). The headers made here of plain ASCII tokens are
        # stored as they are (Message.set_raw): parsing each one into a header object was half of
        # composing a mail, and the generator writes a short plain value exactly as that object
        # would fold it (a long one it parses and folds then).
        msg["Subject"] = subject
        msg["From"] = formataddr(("watchfolder", self.sender))
        msg["To"] = ", ".join(recipients)
        _set_plain(msg, "Date", formatdate(stamp, localtime=True))
        _set_plain(msg, "Message-ID", message_id)
        # RFC 3834: tells vacation responders and list servers not to answer.
        _set_plain(msg, "Auto-Submitted", "auto-generated")
        _set_plain(msg, "X-Watchfolder-Kind", kind)
        if job_id is not None:
            _set_plain(msg, "X-Watchfolder-Job", str(job_id))
        if for_admin:
            _set_plain(msg, REDIRECT_HEADER, "admin")
        if _is_address(self.notify.contact):
            msg["Reply-To"] = self.notify.contact
        # multipart/alternative of a text and an HTML part, each quoted-printable (7-bit, so
        # servers without 8BITMIME take it too): the same headers and bytes as
        # EmailMessage.set_content + add_alternative write, without their header parsing. The
        # boundary is set here, not by the generator, which compiles a regular expression for
        # each new boundary to look for it in the text (a millisecond per mail). A random number
        # between '=' runs (the generator's own form) cannot occur in quoted-printable parts,
        # where '=' is always '=3D'.
        msg.set_raw("MIME-Version", "1.0")
        # Content-Type parsed once here: the generator reads it several times per part.
        msg["Content-Type"] = f'multipart/alternative; boundary="==============={random.getrandbits(64):020d}=="'
        msg.set_payload([
            _text_part(templates.text.substitute(plain), "plain"),
            _text_part(templates.html.substitute(rich), "html", mime_version=True),
        ])
        return Mail(kind=kind, recipients=tuple(recipients), message=msg)


def _set_plain(msg: EmailMessage, name: str, value: str) -> None:
    """Set a header made by this module: as it is when plain ASCII (no parsing), else parsed."""
    if value.isascii() and value.isprintable():
        msg.set_raw(name, value)
    else:
        msg[name] = value


def _text_part(body: str, subtype: str, *, mime_version: bool = False) -> EmailMessage:
    """A ``text/<subtype>`` part in UTF-8, quoted-printable: what ``set_content(body,
    subtype=subtype, charset="utf-8", cte="quoted-printable")`` makes (lines ended as
    :mod:`email.contentmanager` ends them; ``mime_version`` as ``add_alternative`` adds it)."""
    part = EmailMessage(policy=MAIL_POLICY)
    part["Content-Type"] = f'text/{subtype}; charset="utf-8"'
    lines = body.encode("utf-8").splitlines()
    part.set_payload(quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"),
                                            MAIL_POLICY.max_line_length))
    part.set_raw("Content-Transfer-Encoding", "quoted-printable")
    if mime_version:
        part.set_raw("MIME-Version", "1.0")
    return part


# ---------------------------------------------------------------- templates


def load_templates(override_dir: Path | str | None = None) -> dict[str, _Templates]:
    """Read and check every template: the defaults, replaced file by file from ``override_dir``.

    Raises :class:`ConfigError` naming the file and the fix for an unknown
    variable, a malformed placeholder, a missing subject line or an unknown
    template file name in ``override_dir``.
    """
    overrides: dict[str, Path] = {}
    if override_dir is not None:
        folder = Path(override_dir)
        known = {f"{kind}.{ext}" for kind in KINDS for ext in ("txt", "html")}
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            raise ConfigError(f"notify.templates_dir: cannot read {folder}: {exc.strerror}") from None
        for entry in entries:
            if entry.suffix not in (".txt", ".html"):
                continue
            if entry.name not in known:
                hint = difflib.get_close_matches(entry.name, sorted(known), n=1)
                fix = f"did you mean {hint[0]}?" if hint else f"known names: {', '.join(sorted(known))}"
                raise ConfigError(f"notify.templates_dir: {entry} is not a template this service uses; {fix}")
            overrides[entry.name] = entry
    out = {}
    for kind in KINDS:
        parts = {}
        for ext in ("txt", "html"):
            name = f"{kind}.{ext}"
            path = overrides.get(name, DEFAULT_TEMPLATES_DIR / name)
            try:
                # utf-8-sig: an editor's byte-order mark must not hide the Subject line.
                source = path.read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"notify.templates_dir: cannot read template {path}: {exc}") from None
            parts[ext] = source
        allowed = VARIABLES[kind]
        txt_path = overrides.get(f"{kind}.txt", DEFAULT_TEMPLATES_DIR / f"{kind}.txt")
        html_path = overrides.get(f"{kind}.html", DEFAULT_TEMPLATES_DIR / f"{kind}.html")
        subject, text = _split_subject(parts["txt"], txt_path)
        out[kind] = _Templates(
            subject=_checked(subject, txt_path, allowed - {"subject"}, "the subject line"),
            text=_checked(text, txt_path, allowed, "the body", first_line=2),
            html=_checked(parts["html"], html_path, allowed, "the body"),
        )
    return out


def _split_subject(source: str, path: Path) -> tuple[str, str]:
    first, _, rest = source.partition("\n")
    if not first.startswith(SUBJECT_PREFIX):
        raise ConfigError(
            f"notify.templates_dir: {path}: the first line must be the subject, "
            f"e.g. 'Subject: Imported: $acquisition', got {first[:60]!r}"
        )
    return first[len(SUBJECT_PREFIX):].strip(), rest


def _checked(
    source: str, path: Path, allowed: frozenset[str], part: str, first_line: int = 1
) -> string.Template:
    template = string.Template(source)
    if not template.is_valid():
        match = next(m for m in template.pattern.finditer(source) if m.group("invalid") is not None)
        start = match.start()
        line = source.count("\n", 0, start) + first_line
        column = start - (source.rfind("\n", 0, start) + 1) + 1
        snippet = source[start:start + 20].split("\n")[0]
        raise ConfigError(
            f"notify.templates_dir: {path}: bad placeholder at {snippet!r} in {part}, "
            f"line {line}, column {column}; "
            f"write $name or ${{name}}, and $$ for a literal dollar sign"
        )
    for name in template.get_identifiers():
        if name not in allowed:
            hint = difflib.get_close_matches(name, sorted(allowed), n=1)
            fix = f"did you mean ${hint[0]}? " if hint else ""
            raise ConfigError(
                f"notify.templates_dir: {path} uses unknown variable ${name} in {part}; {fix}"
                f"available: {', '.join('$' + v for v in sorted(allowed))}"
            )
    return template


# ------------------------------------------------------------------ helpers


def _status_block(status: dict) -> _Block:
    """A component's status as an indented list (text) and a table (HTML)."""
    lines = [f"  {key}: {_show(value)}" for key, value in sorted(status.items())]
    rows = "".join(
        f"<tr><th style=\"text-align: left; padding-right: 1em;\">{_esc(str(key))}</th>"
        f"<td>{_esc(_show(value))}</td></tr>\n"
        for key, value in sorted(status.items())
    )
    return _Block(_lines(*lines) + "\n" if lines else "  (empty)\n",
                  f'<table style="border-collapse: collapse;">\n{rows}</table>')


def _lines(*lines: str) -> str:
    """Text lines of a mail, joined: control characters inside each escaped (:func:`printable`).

    Every text block is built through here, so a name holding a newline stays on its line.
    """
    return "\n".join(printable(line) for line in lines)


def _esc(value: str) -> str:
    """``value`` for the HTML part: control characters escaped as in the text part (:func:`printable`:
    a newline in a name shows as ``\\n``), then HTML-escaped. Every value written into the HTML
    part goes through here, so the HTML carries no raw control character from a name either."""
    return html.escape(printable(value), quote=True)


def _is_address(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\s*[^@\s<>,;]+@[^@\s<>,;]+\s*", value) is not None


#: A line break with the blanks around it (what :func:`_one_line` joins with one space).
_LINE_BREAK = re.compile(r"\s*[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]\s*")


def _one_line(value: str, limit: int) -> str:
    """``value`` on one line, cut to ``limit`` characters: its line breaks become spaces; runs of
    spaces stay as given (a name with two spaces keeps them, in the subject too)."""
    value = _LINE_BREAK.sub(" ", value).strip()
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "…"


def _acquisition_name(job: Job) -> str:
    spec = job.spec
    if spec.name:
        return printable(spec.name)
    # A one-file *folder* is still named after its folder; JobSpec.acquisition_name knows which is which.
    return printable(spec.acquisition_name or spec.root or f"job {job.id}")


def _file_sizes(job: Job) -> list[tuple[str, int | None]]:
    """(relative path, size) of each file, sizes from the result when the spec lacks them."""
    result_sizes: dict[str, int] = {}
    for entry in (job.result or {}).get("files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("size"), int):
            result_sizes[str(entry.get("path"))] = entry["size"]
    return [(f.path, f.size if f.size is not None else result_sizes.get(f.path)) for f in job.spec.files]


def _files_block(sizes: list[tuple[str, int | None]]) -> _Block:
    if not sizes:
        return _Block("", "")
    rows = []
    for path, size in sizes[:MAX_LISTED]:
        path = printable(path)
        shown = f" ({_size(size)})" if size is not None else ""
        rows.append((f"{path}{shown}", f"<code>{_esc(path)}</code>{_esc(shown)}"))
    return _list_block("Files", rows, len(sizes))


def _with_left_out(block: _Block, left_out: Any) -> _Block:
    """The files block followed by what was left out of the acquisition (excluded names, links), if anything."""
    if not left_out or not isinstance(left_out, list):
        return block
    rows = [(printable(str(x)), f"<code>{_esc(printable(str(x)))}</code>") for x in left_out[:MAX_LISTED]]
    extra = _list_block("Left out (not imported)", rows, len(left_out))
    return _Block(block.text + extra.text, block.html + extra.html)


def _list_block(title: str, rows: list[tuple[str, str]], total: int) -> _Block:
    """A titled list in text and HTML (``rows`` of (text, html)), with "and N more" past MAX_LISTED."""
    lines = [f"  {text}" for text, _ in rows]
    items = [f"<li>{html}</li>" for _, html in rows]
    if total > MAX_LISTED:
        more = f"and {total - MAX_LISTED} more"
        lines.append(f"  … {more}")
        items.append(f"<li>… {more}</li>")
    return _Block(
        f"{title}:\n" + _lines(*lines) + "\n\n",
        f"<p>{title}:</p>\n<ul>\n" + "\n".join(items) + "\n</ul>\n",
    )


def _about_block(description: str | None, annotations: dict[str, str] | None) -> _Block:
    """The acquisition's own description and annotations, repeated so the owner recognises it."""
    text, rich = [], []
    if description:
        description = _one_line(description, 2000)
        text.append(_lines("Description: " + description))
        rich.append(f"<p>Description: {_esc(description)}</p>")
    if annotations:
        rows = [(f"{k}: {_one_line(str(v), 500)}", f"<b>{_esc(k)}</b>: {_esc(_one_line(str(v), 500))}")
                for k, v in sorted(annotations.items())]
        block = _list_block("Annotations", rows[:MAX_LISTED], len(rows))
        text.append(block.text.rstrip("\n"))
        rich.append(block.html)
    if not text:
        return _Block("", "")
    return _Block("\n".join(text) + "\n\n", "\n".join(rich) + "\n")


def _log_tail(path: str | None) -> _Block:
    if not path:
        text = "(this job has no log file)"
    else:
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - LOG_TAIL_BYTES))
                data = fh.read()
        except FileNotFoundError:
            text = f"(no log file: {path} does not exist)"
        except OSError as exc:
            text = f"(cannot read the log file {path}: {exc.strerror})"
        else:
            lines = data.decode("utf-8", "replace").splitlines()
            if size > LOG_TAIL_BYTES and lines:
                lines = lines[1:]  # the first line read is probably cut
            text = "\n".join(lines[-LOG_TAIL_LINES:]) if lines else "(the log is empty)"
    lines = text.splitlines()  # each line escaped on its own: the log's line breaks stay, a name's do not
    return _Block(_lines(*("  " + line for line in lines)) + "\n",
                  '<pre style="background: #f4f4f4; padding: 0.5em;">' + "\n".join(map(_esc, lines)) + "</pre>")


def _cancelled_by(job: Job) -> str:
    for entry in reversed(job.history):
        if entry.state == JobState.CANCELLED and entry.message:
            return f" ({_one_line(entry.message, 120)})"
    return ""


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "(not yet)"
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "an unknown time"
    return _format_seconds(max(0.0, end - start))


def _format_seconds(seconds: float) -> str:
    """Human duration: ``0.4 s``, ``42 s``, ``3 min 5 s``, ``2 h 3 min``, ``1 d 4 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


_size = format_size


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _show(value: Any) -> str:
    if isinstance(value, float) and value > 1e9:  # a Unix time
        return _when(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value) or "(none)"
    return str(value)


def _alike(failures: list[tuple[int | None, str]], key: str) -> bool:
    """More than one wording of a reason in one digest group."""
    return len({r for _, r in failures if reason_group(r) == key}) > 1
