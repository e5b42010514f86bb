"""The outbox sender: delivers the mails that finished jobs left in the store.

A mail is marked sent right after the server accepted it. The remaining
window: a crash after the server accepted a mail and before that mark is
written sends it again after the claim expires (``notify.claim_hold``; the
Message-ID stays the same, so mail clients show it once). SMTP being down
loses nothing and gives nothing up: mails wait in the outbox and are retried
with backoff up to its cap (the last value of ``notify.retry.backoff``) for as
long as the outage lasts; the backlog shows in ``watchfolder status`` and the
dashboard. A refusal of the service's own session or sender address is a
configuration problem and transient too. Only a permanent refusal of this
mail (a 5xx to its recipients or data, e.g. an unknown recipient) leaves a
mail ``failed``; ``watchfolder mail resend ID`` queues it again.

No send outlives its claim: each batch has an overall deadline, half of the
hold after its claim, which the transport enforces (see :class:`OutboxSender`).
"""

from __future__ import annotations

import logging
import threading
import time
from email.parser import BytesHeaderParser

from .. import defaults as D
from ..errors import JobNotFound
from ..store import JobStore
from ..store.outage import fault_level
from .message import MailError, Transport
from .notify import admin_bound

log = logging.getLogger(__name__)


class OutboxSender:
    """``loop(now)`` sends what is due once; ``drain()`` until nothing is due; ``run(stop)`` until stopped.

    ``hold`` (seconds) is how long a claimed mail stays ``sending``; a batch is at
    most as many mails as fit in half of it at the transport's timeout each. A slow
    server never lets a claim expire under a send in progress: every send of a batch
    gets the overall deadline "half of ``hold`` after the claim" (the transport cuts
    the exchange off there, before DATA is accepted: the mail stays pending, never
    sent twice), and the mails whose turn comes after it go back to ``pending``
    untried, their attempt not counted. The other half is the margin for marking
    the mail sent and for the clocks of several hosts.

    Store faults (:meth:`JobStore.is_fault`: the database locked, PostgreSQL down, a
    full data disk) in the loop are logged once per streak as a warning and "works
    again" when it ends; anything else is a bug and logged with its traceback.
    """

    def __init__(self, store: JobStore, transport: Transport, *, poll_interval: float = 1.0,
                 batch: int = D.MAIL_BATCH, hold: float = D.MAIL_CLAIM_HOLD_SECONDS,
                 sweep_interval: float = D.OUTBOX_TEMP_MAX_AGE, notifier=None):
        self.store = store
        # With a notifier, bursts of admin failure mails become digests (notify.admin_digest_*).
        self.notifier = notifier
        self.transport = transport
        self.poll_interval = poll_interval
        self.hold = float(hold)
        timeout = max(float(getattr(transport, "timeout", 1.0) or 1.0), 0.001)
        self.batch = max(1, min(batch, int(self.hold / (2 * timeout))))
        self.sweep_interval = sweep_interval
        self._next_sweep = 0.0
        # Transient delivery failures since the last success: the first is a WARNING, the
        # rest DEBUG (a server down or a full disk fails every mail, every retry), and the
        # next success says how many there were.
        self._failing = 0
        # A store fault streak in run(): the first is a WARNING, the end is said once.
        self._store_failing = False

    def loop(self, now: float | None = None) -> int:
        """Send one batch of the mails that are due; returns how many the server accepted."""
        return self._batch(now)[1]

    def _batch(self, now: float | None) -> tuple[int, int]:
        """(claimed, accepted) for one batch."""
        sent = 0
        # Taken before the claim: its hold runs from a moment after this one.
        deadline = time.monotonic() + self.hold / 2
        mails = self.store.outbox_claim(now=now, limit=self.batch, hold=self.hold)
        claimed = len(mails)
        if self.notifier is not None and any(admin_bound(m) for m in mails):
            mails = self._digest(mails, time.time() if now is None else now)
        for index, mail in enumerate(mails):
            if time.monotonic() >= deadline:
                # No time left under this claim: the rest wait for the next round, untried.
                late = [m.id for m in mails[index:]]
                self.store.outbox_hold(late, until=time.time() if now is None else now, now=now)
                log.info("%d mail(s) put back untried: the batch used up its half of notify.claim_hold (%g s)",
                         len(late), self.hold)
                break
            try:
                self.transport.send(mail.raw, mail.sender, mail.recipients, deadline=deadline)
            except MailError as exc:
                state = self.store.outbox_failed(mail.id, str(exc), permanent=exc.permanent, now=now)
                level = logging.WARNING if exc.permanent or not self._failing else logging.DEBUG
                if not exc.permanent:
                    self._failing += 1
                log.log(level, "mail %s to %s: %s (%s%s)", mail.id, ", ".join(mail.recipients), exc, state.state,
                        "" if exc.permanent else "; further failures like it are not logged until a mail goes out")
            except Exception as exc:  # a bug in a transport must not lose the mail
                log.exception("mail %s: unexpected error", mail.id)
                self.store.outbox_failed(mail.id, f"{type(exc).__name__}: {exc}", permanent=False, now=now)
            else:
                self._mark_sent(mail.id, deadline + self.hold * 0.4, now)
                sent += 1
                if self._failing:
                    log.info("mail delivery works again after %d failed attempt(s)", self._failing)
                    self._failing = 0
        return claimed, sent

    def _mark_sent(self, mail_id: int, until: float, now: float | None) -> None:
        """Mark an accepted mail sent, waiting out a store fault (the database locked by
        another process, a server restart) until ``until`` (monotonic, before the claim
        runs out): a mark lost to a short lock would let another sender deliver it again."""
        delay = 0.25
        while True:
            try:
                self.store.outbox_sent(mail_id, now=now)
                return
            except Exception as exc:
                if not self.store.is_fault(exc) or time.monotonic() + delay >= until:
                    raise
                log.debug("mail %s: accepted, but marking it sent failed (%s); trying again in %g s",
                          mail_id, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 4.0)

    def _digest(self, mails: list, now: float) -> list:
        """Admin failure mails beyond ``admin_digest_after`` within the window go out as one digest.

        Returns the mails still to send one by one. A digest is composed at most
        once per window; failures arriving after it wait (held in the outbox)
        for the next one, so a storm of failures makes one mail per window.

        A failure the admin was already told about is never folded into a digest
        (counted or listed again): a mail resent with ``mail resend`` after a digest
        took it (it names that digest, ``digest_id``) goes out on its own, as the
        admin asked, and so does a mail whose failure (its job, at the same moment)
        an earlier digest or a mail already sent reported.
        """
        notify = self.notifier.notify
        window = notify.admin_digest_minutes * 60.0
        everything = self.store.outbox_list(limit=100_000)
        recent = [m for m in everything if m.created_at >= now - window]
        reported = _Reported(everything)
        # Owner mails redirected to the admin (no owner, no address) go with the admin's own.
        admin = [m for m in mails if admin_bound(m) and not reported(m)]
        if not admin:
            return mails
        # Held mails come back after the window: they count even though they are older. One
        # failure counts once, however many of its mails reach the admin.
        burst = max(len(_jobs_of(admin)), len(_jobs_of(m for m in recent if admin_bound(m))))
        if burst <= notify.admin_digest_after:
            return mails
        chosen = {m.id for m in admin}
        rest = [m for m in mails if m.id not in chosen]
        digests = [m.created_at for m in recent if m.kind == "admin_digest"]
        if digests:
            self.store.outbox_hold([m.id for m in admin], until=max(digests) + window, now=now)
            return rest
        # Everything due joins this digest (held ones included), not only this batch.
        for more in self.store.outbox_claim(now=now, limit=100_000, hold=self.hold):
            (admin if admin_bound(more) and not reported(more) else rest).append(more)
        failures = {}
        for m in admin:  # one line per failed job, whichever of its mails
            job_id, reason = self._failure(m)
            failures.setdefault(job_id if job_id is not None else -m.id, (job_id, reason))
        digest = self.notifier.compose_admin_digest(list(failures.values()), now=now)
        if digest is not None:  # the single mails are 'digested' (in digest N), not sent
            self.store.outbox_digest(digest, [m.id for m in admin], now=now)
        else:
            for m in admin:  # no admin address: nothing to send them to
                self.store.outbox_sent(m.id, now=now)
        rest += self.store.outbox_claim(now=now, limit=self.batch, hold=self.hold)  # the digest itself goes out now
        log.warning("%d permanent failures in %g min: one digest mail to the admin instead of single mails",
                    len(failures), notify.admin_digest_minutes)
        return rest

    def _failure(self, mail) -> tuple[int | None, str]:
        """(job id, reason) of an admin failure mail, the reason from the job itself."""
        header = BytesHeaderParser().parsebytes(mail.raw).get("X-Watchfolder-Job")
        job_id = int(header) if header and str(header).strip().isdigit() else mail.job_id
        reason = mail.subject
        if job_id is not None:
            try:
                job = self.store.get(job_id)
                if job.error is not None:
                    reason = job.error.message
            except JobNotFound:
                pass
        return job_id, reason

    def drain(self, *, deadline: float | None = None, now: float | None = None) -> int:
        """Send batches until no mail is due (or ``deadline``, a ``time.monotonic()`` value,
        passes); returns how many were accepted. Mails that fail wait for their next
        attempt, so this ends even while the server is down."""
        sent = 0
        while deadline is None or time.monotonic() < deadline:
            claimed, accepted = self._batch(now)
            sent += accepted
            if not claimed:
                break
        return sent

    def sweep(self) -> None:
        """Remove the transport's leftovers of interrupted sends (at start and every ``sweep_interval``)."""
        self._next_sweep = time.monotonic() + self.sweep_interval
        try:
            self.transport.sweep()
        except Exception:  # housekeeping must never stop the sender
            log.exception("outbox sweep failed")

    def run(self, stop: threading.Event) -> None:
        self.sweep()
        while not stop.is_set():
            if time.monotonic() >= self._next_sweep:
                self.sweep()
            try:
                accepted = self.loop()
            except Exception as exc:  # keep the sender alive through store hiccups and bugs
                if self.store.is_fault(exc):
                    if not self._store_failing:
                        log.log(fault_level(exc), "outbox sender: the job store failed (%s); "
                                "trying again every %g s", exc, self.poll_interval)
                    self._store_failing = True
                else:
                    log.exception("outbox sender loop failed")
                stop.wait(self.poll_interval)
                continue
            if self._store_failing:
                self._store_failing = False
                log.info("outbox sender: the job store works again")
            if accepted == 0:
                stop.wait(self.poll_interval)
        self.transport.close()



class _Reported:
    """Whether an admin-bound mail's failure was already reported to the admin: the mail itself
    went into a digest before (``digest_id``: it was resent since), or another admin-bound mail
    of the same failure (same job, composed at the same moment) went into a digest or was sent."""

    def __init__(self, outbox: list):
        self._told: dict = {}
        for m in outbox:  # only the headers of the asked jobs' mails are read (admin_bound)
            if m.job_id is not None and m.state in ("digested", "sent"):
                self._told.setdefault((m.job_id, m.created_at), []).append(m)

    def __call__(self, mail) -> bool:
        if mail.digest_id is not None:
            return True
        others = self._told.get((mail.job_id, mail.created_at), ())
        return any(m.id != mail.id and admin_bound(m) for m in others)


def _jobs_of(mails) -> set:
    """The failed jobs a set of admin-bound mails are about (a mail without a job counts alone)."""
    return {m.job_id if m.job_id is not None else ("mail", m.id) for m in mails}
