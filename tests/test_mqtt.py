"""Events out over MQTT: a real Mosquitto broker started by the test, a real paho subscriber."""

from __future__ import annotations

import json
import os
import threading

import pytest
from events_support import Broker, mosquitto_binary
from helpers import wait_until

from watchfolder.service import Parts, Service

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="needs Debian's mosquitto (make test-deps installs it)"
)
JOBS = int(os.environ.get("WATCHFOLDER_EVENTS_JOBS", "20"))


class Subscriber:
    """A paho client subscribed to ``<prefix>/#`` at QoS 1, recording (topic, CloudEvent)."""

    def __init__(self, port: int, prefix: str):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-subscriber")

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe(f"{prefix}/#", qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            ready.set()

        def on_message(client, userdata, message):
            with self.lock:
                self.messages.append((message.topic, json.loads(message.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10), "the subscription was not acknowledged"

    def received(self) -> list[tuple[str, dict]]:
        with self.lock:
            return list(self.messages)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    yield b
    b.stop()


def test_each_job_state_change_is_published_at_qos1_on_owner_and_state_topics(broker, make_config, make_spec):
    subscriber = Subscriber(broker.port, "facility/wf")
    config = make_config(
        events={"mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": "facility/wf"}},
        workers={"count": 2, "poll_interval": 0.05},
    )
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    service.start()
    service.dispatcher.poll_interval = 0.05
    try:
        owners = ["jdoe", "alice"]
        jobs = [service.store.enqueue(make_spec(owner=owners[i % 2], files={f"f{i}.tif": b"m" * (i + 1)}))[0]
                for i in range(JOBS)]
        wait_until(lambda: sum(t.endswith("/succeeded") for t, _ in subscriber.received()) == JOBS,
                   timeout=60, message="every job's success on MQTT")
        service.store.set_component("watcher", "lsm/980", {"health": "unhealthy", "path": "/drop", "error": "gone"})
        wait_until(lambda: any("/watchers/" in t for t, _ in subscriber.received()), timeout=10)
    finally:
        service.stop()
        subscriber.stop()
    messages = subscriber.received()
    for job in jobs:
        mine = [(t, e) for t, e in messages if e["subject"] == f"job/{job.id}"]
        assert [t for t, _ in mine] == [f"facility/wf/jobs/{job.owner}/{s}" for s in ("queued", "running", "succeeded")]
        assert all(e["specversion"] == "1.0" and e["data"]["job_id"] == job.id for _, e in mine)
    (topic, event), = [(t, e) for t, e in messages if "/watchers/" in t]
    assert topic == "facility/wf/watchers/lsm%2F980/health"  # '/' in a name cannot add topic levels
    assert event["data"]["health"] == "unhealthy"


def test_broker_down_then_up_every_event_goes_out_when_it_is_back(tmp_path, make_config, make_spec):
    broker = Broker(tmp_path)
    port = broker.port
    config = make_config(
        events={"mqtt": {"host": "127.0.0.1", "port": port, "timeout": 2}, "retry": {"backoff": [0.2, 0.5]}},
        workers={"count": 1, "poll_interval": 0.05},
    )
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    broker.stop()  # down before anything is sent
    service.start()
    service.dispatcher.poll_interval = 0.05
    try:
        # A new sink starts after the newest event: let it exist before the first job is
        # queued, or (under load) that job's first event comes before it and is not its to send.
        wait_until(lambda: service.store.sinks(), timeout=30, message="the MQTT sink registered")
        jobs = [service.store.enqueue(make_spec(files={f"g{i}.tif": b"n" * (i + 1)}))[0] for i in range(5)]
        wait_until(lambda: service.store.counts()["succeeded"] == 5, timeout=30)
        wait_until(lambda: service.store.sinks() and service.store.sinks()[0]["failing_since"], timeout=10)
        restarted = Broker(tmp_path / "again", port=port)  # back on the configured port
        try:
            last = service.store.last_event_id()
            wait_until(lambda: service.store.sinks()[0]["last_id"] == last, timeout=30, message="caught up")
            assert service.store.sinks()[0]["failing_since"] is None
        finally:
            restarted.stop()
    finally:
        service.stop()
    # Every event went out once the broker was back: 5 jobs x 3 state changes, nothing skipped.
    assert len(jobs) == 5 and service.store.sinks()[0]["delivered"] == 15
