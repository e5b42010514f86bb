"""Mail as it moves through the outbox: composed messages and the transports that deliver them."""

from __future__ import annotations

import abc
import email.policy
from dataclasses import dataclass
from email.message import EmailMessage

from .errors import WatchfolderError


class MailError(WatchfolderError):
    """Delivery failed. ``permanent`` means retrying the same mail cannot help (SMTP 5xx)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Mail:
    """A composed mail, ready for the outbox.

    ``kind`` is e.g. ``job_succeeded``, ``job_failed``, ``admin_failure``,
    ``watcher_unhealthy``; ``recipients`` are the envelope recipients.
    """

    kind: str
    recipients: tuple[str, ...]
    message: EmailMessage

    @property
    def sender(self) -> str:
        return str(self.message.get("From") or "")

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject") or "")

    def as_bytes(self) -> bytes:
        # SMTPUTF8 keeps a non-ASCII address readable in the headers; plain SMTP would mangle it.
        ascii_only = all(r.isascii() for r in self.recipients)
        return self.message.as_bytes(policy=email.policy.SMTP if ascii_only else email.policy.SMTPUTF8)


@dataclass(frozen=True)
class OutboxMail:
    """A mail as stored in the outbox."""

    id: int
    job_id: int | None
    kind: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    raw: bytes
    state: str  # pending | sent | failed
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    sent_at: float | None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "recipients": list(self.recipients),
            "subject": self.subject,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "sent_at": self.sent_at,
        }


class Transport(abc.ABC):
    """Delivers one raw RFC 5322 message. Raises :class:`MailError` on failure."""

    name = ""

    @abc.abstractmethod
    def send(self, raw: bytes, sender: str, recipients: tuple[str, ...]) -> None: ...

    def close(self) -> None:
        """Release connections."""
