"""Events out: job state changes and watcher health as CloudEvents, delivered to other systems.

The store writes each event in the transaction that makes the change (see
:mod:`watchfolder.store.base`); :mod:`.dispatcher` delivers them, at least once
and in order, to each configured sink (:mod:`.sinks`: Standard Webhooks
endpoints, an MQTT broker); ``GET /api/v1/events`` serves them to pollers.
"""
