"""The outbox sender: delivers the mails that finished jobs left in the store.

A mail is marked sent right after the server accepted it. The remaining
window: a crash after the server accepted a mail and before that mark is
written sends it again after the claim expires (the Message-ID stays the same,
so mail clients show it once). SMTP being down loses nothing: mails wait in
the outbox and are retried with backoff; one that keeps failing stays
``failed``, visible in ``watchfolder status`` and ``watchfolder mail list``,
and ``watchfolder mail resend ID`` queues it again.
"""

from __future__ import annotations

import logging
import threading

from ..store import JobStore
from .message import MailError, Transport

log = logging.getLogger(__name__)


class OutboxSender:
    """``loop(now)`` sends what is due once; ``run(stop)`` repeats until stopped."""

    def __init__(self, store: JobStore, transport: Transport, *, poll_interval: float = 1.0, batch: int = 20):
        self.store = store
        self.transport = transport
        self.poll_interval = poll_interval
        self.batch = batch

    def loop(self, now: float | None = None) -> int:
        """Send the mails that are due; returns how many the server accepted."""
        sent = 0
        for mail in self.store.outbox_claim(now=now, limit=self.batch):
            try:
                self.transport.send(mail.raw, mail.sender, mail.recipients)
            except MailError as exc:
                state = self.store.outbox_failed(mail.id, str(exc), permanent=exc.permanent, now=now)
                log.warning("mail %s to %s: %s (%s)", mail.id, ", ".join(mail.recipients), exc, state.state)
            except Exception as exc:  # a bug in a transport must not lose the mail
                log.exception("mail %s: unexpected error", mail.id)
                self.store.outbox_failed(mail.id, f"{type(exc).__name__}: {exc}", permanent=False, now=now)
            else:
                self.store.outbox_sent(mail.id, now=now)
                sent += 1
        return sent

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                if self.loop() == 0:
                    stop.wait(self.poll_interval)
            except Exception:  # keep the sender alive through store hiccups
                log.exception("outbox sender loop failed")
                stop.wait(self.poll_interval)
        self.transport.close()
