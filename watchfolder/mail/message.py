"""Mail as it moves through the outbox: composed messages and the transports that deliver them."""

from __future__ import annotations

import abc

from ..errors import WatchfolderError
from ..store.base import Mail, OutboxMail

__all__ = ["CONFIG_PROBLEM", "Mail", "MailError", "OutboxMail", "Transport"]

# How the message of a transient MailError the admin must fix (notify.from, notify.smtp.*)
# begins: kept as the mail's last error, `status` lists such mails as a problem at once.
CONFIG_PROBLEM = "configuration problem: "


class MailError(WatchfolderError):
    """Delivery failed. ``permanent`` means retrying the same mail cannot help (SMTP 5xx)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Transport(abc.ABC):
    """Delivers one raw RFC 5322 message. Raises :class:`MailError` on failure."""

    name = ""

    @abc.abstractmethod
    def send(self, raw: bytes, sender: str, recipients: tuple[str, ...], *, deadline: float | None = None) -> None:
        """Deliver ``raw`` from ``sender`` to ``recipients``. ``deadline``: a ``time.monotonic()``
        value the send must end by (the outbox's claim on the mail runs out later); a
        transport that can block past it must stop and raise a transient :class:`MailError`."""

    # Seconds one send may take at most (the SMTP timeout); sizes the outbox's batches.
    timeout: float = 1.0

    def sweep(self) -> list:
        """Remove what an interrupted send left behind (the folder transport's temp files)."""
        return []

    def close(self) -> None:
        """Release connections."""
