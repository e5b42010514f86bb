"""Where events go: Standard Webhooks endpoints and an MQTT broker.

A sink delivers one event at a time and raises :class:`DeliveryError` when it
could not; the dispatcher keeps the order and retries.
"""

from __future__ import annotations

import fnmatch
import logging
import ssl
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from .. import __version__
from ..errors import WatchfolderError
from .cloudevents import encode, state_of

log = logging.getLogger(__name__)


class DeliveryError(WatchfolderError):
    """A sink could not deliver an event; the dispatcher retries it with backoff."""


class Sink:
    """A destination of events with its filters (fnmatch patterns on the type; owners)."""

    name = ""
    #: Whether a sink that fails for ``disable_after`` seconds is disabled (a webhook is;
    #: a broker being down is an outage to wait out, not a bad endpoint).
    disable_after: float | None = None

    def __init__(self, source: str, types: tuple[str, ...] = (), owners: tuple[str, ...] = ()):
        self.source = source
        self.types = types
        self.owners = frozenset(owners)

    def accepts(self, event: dict[str, Any]) -> bool:
        if self.types and not any(fnmatch.fnmatchcase(event["type"], p) for p in self.types):
            return False
        # Watcher events have no owner; an owner filter is about job events.
        return not self.owners or event.get("owner") is None or event["owner"] in self.owners

    def deliver(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class WebhookSink(Sink):
    """POSTs each event as a CloudEvent (structured mode), signed per Standard Webhooks.

    Headers: ``webhook-id`` (the event id), ``webhook-timestamp`` (Unix seconds),
    ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``), made
    by the ``standardwebhooks`` package, so receivers verify with any Standard
    Webhooks library. Any 2xx is success; anything else is retried.
    """

    def __init__(self, config, source: str):
        from standardwebhooks import Webhook

        super().__init__(source, config.types, config.owners)
        self.name = f"webhook:{config.name}"
        self.url = config.url
        self.timeout = config.timeout
        self.disable_after = config.disable_after
        self._signer = Webhook(config.secret.reveal())

    def deliver(self, event: dict[str, Any]) -> None:
        body = encode(event, self.source)
        msg_id = str(event["id"])
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/cloudevents+json; charset=utf-8",
            "User-Agent": f"watchfolder/{__version__}",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(msg_id, now, body.decode()),
        }
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _NO_REDIRECTS.open(request, timeout=self.timeout) as response:
                response.read(64 * 1024)
                if not 200 <= response.status < 300:  # a 1xx/3xx reaching here is no delivery either
                    raise DeliveryError(f"{self.url} answered {response.status} {response.reason}")
        except urllib.error.HTTPError as exc:
            where = exc.headers.get("Location") if 300 <= exc.code < 400 else None
            moved = f" (to {where}: a redirect is not followed, update the webhook's url)" if where else ""
            raise DeliveryError(f"{self.url} answered {exc.code} {exc.reason}{moved}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DeliveryError(f"cannot reach {self.url}: {reason}") from None


class _Refuse(urllib.request.HTTPRedirectHandler):
    """Redirects are answers, not deliveries: following one would turn the POST into a GET
    without the event (urllib does so for 301/302/303) and count it delivered."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse())


class MqttSink(Sink):
    """Publishes each event at QoS 1 on ``<prefix>/jobs/<owner>/<state>`` (job events) or
    ``<prefix>/watchers/<name>/health`` (watcher events), waiting for the broker's PUBACK.

    The payload is the CloudEvent JSON (MQTT binding, structured mode).
    """

    def __init__(self, config, source: str):
        super().__init__(source, config.types, config.owners)
        self.config = config
        self.name = "mqtt"
        self.prefix = config.topic_prefix
        self._client = None
        self._connected = threading.Event()
        self._error: str | None = None

    def topic(self, event: dict[str, Any]) -> str:
        subject = event["subject"]
        if subject.startswith("watcher/"):
            return f"{self.prefix}/watchers/{_topic_level(subject[8:])}/{state_of(event)}"
        owner = _topic_level(event.get("owner") or "")
        return f"{self.prefix}/jobs/{owner}/{state_of(event)}"

    def _connect(self):
        import paho.mqtt.client as mqtt

        c = self.config
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=c.client_id or "", clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if c.username:
            client.username_pw_set(c.username, c.password.reveal() if c.password else None)
        if c.tls:
            client.tls_set_context(ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None))
        self._connected.clear()

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                self._error = f"the broker refused the connection: {reason_code}"
            else:
                self._error = None
                self._connected.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self._connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        try:
            client.connect(c.host, c.port, keepalive=30)
        except OSError as exc:
            raise DeliveryError(f"cannot reach the MQTT broker {c.host}:{c.port}: {exc.strerror or exc}") from None
        client.loop_start()
        if not self._connected.wait(c.timeout):
            client.loop_stop()
            client.disconnect()
            raise DeliveryError(self._error or f"the MQTT broker {c.host}:{c.port} did not answer in {c.timeout:g} s")
        return client

    def deliver(self, event: dict[str, Any]) -> None:
        if self._client is None or not self._connected.is_set():
            self.close()
            self._client = self._connect()
        info = self._client.publish(self.topic(event), encode(event, self.source), qos=1)
        try:
            info.wait_for_publish(self.config.timeout)
        except (RuntimeError, ValueError) as exc:  # not queued: the connection dropped
            self.close()
            raise DeliveryError(f"MQTT publish failed: {exc}") from None
        if not info.is_published():
            self.close()
            raise DeliveryError(f"the MQTT broker did not acknowledge within {self.config.timeout:g} s")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
                client.loop_stop()
            except Exception:  # closing a broken connection must not raise
                log.debug("closing the MQTT client failed", exc_info=True)


def _topic_level(value: str) -> str:
    """One topic level for a free-text name (an owner, a watcher): percent-encoded wherever MQTT
    gives a character a meaning (``/``, ``+``, ``#``, NUL) and for ``%`` itself, so that two names
    never share a topic; an empty name is ``%00`` (no name can encode to it)."""
    if not value:
        return "%00"
    return "".join(f"%{ord(c):02X}" if c in "/+#%\0" else c for c in value)


def create_sinks(config) -> list[Sink]:
    """The sinks named in ``config.events``."""
    events = config.events
    sinks: list[Sink] = [WebhookSink(h, events.source) for h in events.webhooks]
    if events.mqtt is not None:
        sinks.append(MqttSink(events.mqtt, events.source))
    return sinks
