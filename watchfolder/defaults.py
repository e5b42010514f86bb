"""Default values, in one place. Config keys fall back to these."""

CONFIG_ENV = "WATCHFOLDER_CONFIG"
ENV_PREFIX = "WATCHFOLDER__"  # WATCHFOLDER__WORKERS__COUNT=4 overrides workers.count

DATA_DIR = "./watchfolder-data"
DB_NAME = "watchfolder.db"
LOG_LEVEL = "info"

# normal: a process crash (kill -9) loses nothing; an OS crash or power cut may
# lose the last transactions, and the store flushes to disk before anything
# irreversible (deleting or moving a source after success). full: every commit
# waits for the disk (about 3 fsyncs per job).
STORE_SYNCHRONOUS = "normal"
LEASE_SECONDS = 60.0
BUSY_TIMEOUT_SECONDS = 30.0
# store.url: postgresql://… — connections per process (the pool grows to this), how
# long a call waits for one, and the reconnect backoff of workers and watchers.
PG_POOL_MAX = 8
PG_CONNECT_TIMEOUT_SECONDS = 10.0
RECONNECT_BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A watch folder is held by one watcher at a time; the holder renews its lease
# every third of this, and another watcher takes over once it expired.
FOLDER_LEASE_SECONDS = 30.0
# Consumed queue messages are deleted this often (they slow litequeue's peek down).
PRUNE_SECONDS = 10.0
# After a checkpoint the write-ahead log is truncated to this size (it keeps its peak otherwise).
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024

WORKER_COUNT = 2
WORKER_POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
# A worker row whose heartbeat is older than this (or 10 of its intervals, if
# longer) belongs to a process that died without removing it (kill -9, host
# lost): it is forgotten, with one warning, so health recovers on its own.
WORKER_PRUNE_SECONDS = 600.0
SHUTDOWN_GRACE_SECONDS = 30.0
PROGRESS_MIN_INTERVAL = 0.5
# Job log lines kept in memory while the data disk refuses them (full, I/O error); the oldest go first.
LOG_BACKLOG_LINES = 1000

RETRY_MAX_ATTEMPTS = 5
RETRY_BACKOFF = (30.0, 120.0, 600.0, 1800.0)

ARCHIVE_LAYOUT = "{owner}/{project}/{dataset}/{acquisition}"
# The archive's jobs pause (instead of failing one by one) below this much free space.
ARCHIVE_MIN_FREE_BYTES = 1024**3
COPY_CHUNK_BYTES = 1024 * 1024
# An archive acquisition of at least this many files is made durable with one syncfs of the
# volume; fewer, with an fsync per file and folder (syncfs also waits for every other writer).
SYNCFS_MIN_FILES = 64

NOTIFY_TRANSPORT = "folder"
MAIL_FROM = "watchfolder@localhost"
MAIL_MAX_ATTEMPTS = 10
MAIL_BACKOFF = (30.0, 60.0, 300.0, 900.0, 3600.0)  # the last value is the cap, repeated forever
# A claimed mail stays 'sending' this long at most; a sender killed mid-batch
# leaves its claims for another one after it. A batch is sized to fit in it.
MAIL_CLAIM_HOLD_SECONDS = 300.0
MAIL_BATCH = 20
# Temporary files of the folder transport older than this were left by a crash.
OUTBOX_TEMP_MAX_AGE = 60.0
SMTP_PORT = 25
SMTP_TIMEOUT = 30.0
WATCHER_UNHEALTHY_MAIL_AFTER = 600.0

LISTEN = "127.0.0.1:8470"
# Few threads serve more: every SQLite call hands the GIL over, and 8 threads
# spent more time switching than working (bench/bench_api.py).
SERVER_THREADS = 4
MAX_BODY_BYTES = 1024 * 1024
# Open connections waitress keeps (its default, 100, let 110 idle clients stall
# every request); a connection silent this long is closed.
SERVER_CONNECTION_LIMIT = 1000
SERVER_IDLE_TIMEOUT = 30.0
# A client must send a request's complete headers within this many seconds of starting it
# (slowloris: a header line every few seconds would otherwise hold a connection forever).
SERVER_HEADER_TIMEOUT = 15.0
# A client must send a whole request (headers and body) within this many seconds of starting
# it (a body trickled a byte every few seconds would otherwise hold a connection forever).
SERVER_BODY_TIMEOUT = 60.0
# Connections one client address may hold; past it, its oldest one still sending headers is closed.
SERVER_CONNECTIONS_PER_CLIENT = 100
# /ome/import (no bearer token): items per request, and requests per minute per client address.
SEED_MAX_ITEMS = 100
SEED_RATE_PER_MINUTE = 60
# Its session check (one long-lived OMERO child): the longest one check may take before the
# child is deemed hung (killed, 503), and how long a key OMERO accepted is not asked again.
SEED_SESSION_TIMEOUT = 10.0
SEED_SESSION_CACHE_SECONDS = 30.0
# Checks waiting for OMERO at once (more answer 503 at once): server.threads // 2, at least 1,
# so the other threads keep serving /health and the API however slow OMERO is.
SEED_SESSION_CHECKS = None
# That many checks in a row OMERO did not answer open the breaker: every check answers 503 at once
# for this many seconds, then one probes.
SEED_BREAKER_FAILURES = 3
SEED_SESSION_PAUSE = 30.0

WATCH_MODE = "auto"
WATCH_DETECTION = "manifest"
MANIFEST_NAME = "watchfolder.json"
SIDECAR_SUFFIX = ".json"
QUIET_SECONDS = 30.0
POLL_SECONDS = 5.0
RESCAN_SECONDS = 3600.0
MISSING_TIMEOUT_SECONDS = 3600.0
# Windows Explorer writes Thumbs.db, ehthumbs.db and desktop.ini into folders it shows (an
# instrument PC browsing its share): never data, like the dot-files macOS writes (.DS_Store).
# At the top of a share or disk: Windows' recycle bin and System Volume Information, ext4's
# lost+found, and macOS's custom-icon file Icon\r (its name ends in a carriage return).
EXCLUDE_PATTERNS = ("~$*", "*.tmp", "*.part", ".*", "Thumbs.db", "ehthumbs.db", "desktop.ini",
                    "$RECYCLE.BIN", "System Volume Information", "lost+found", "Icon\r")
# Of those, what an operating system makes by itself: excluded without a pending note (a person
# has nothing to do about them; every share would list its recycle bin forever).
SYSTEM_NAMES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information",
                          "lost+found", "Icon\r", ".DS_Store", ".Trashes", ".Spotlight-V100", ".fseventsd",
                          ".TemporaryItems", ".snapshot"})
# Of those, the files an OS drops into any folder it shows; the others are made at the top of
# a share or disk only (a dataset folder named lost+found deeper down is a person's, and listed).
SYSTEM_FILE_NAMES = frozenset({"Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r", ".DS_Store"})
# Names of a copy in progress (a transfer writes under such a name, then renames it): an
# acquisition holding one that the patterns leave out is still being copied, whatever the
# quiet period says. (Not ~$*: Office's lock file of a document left open says nothing
# about the data.)
IN_PROGRESS_PATTERNS = ("*.part", "*.tmp")
# Folder formats whose inside is never filtered by the patterns (their dot-files are metadata).
CONTAINER_SUFFIXES = (".zarr", ".n5")

OMERO_PORT = 4064
OMERO_TIMEOUT = 3600.0
OMERO_SUDO_TTL_MS = 600_000
# The least importer.omero.sudo_ttl_ms (the owner's session's idle timeout) accepted: two of
# omero-py's shortest keep-alive intervals (it refuses 5 s or less, so 6 s), so that a keep-alive
# always comes in time. Below it the config is refused (it used to be raised to this silently).
OMERO_SUDO_TTL_MIN_MS = 12_000
# Imports at once against one OMERO server from one service process, whatever the worker count.
OMERO_MAX_CONCURRENT = 4
# Files of one fileset uploaded at once by the OMERO child (omero import --parallel-upload).
OMERO_PARALLEL_UPLOAD = 4

# Back-pressure: this many connection failures in a row pause an importer's target;
# while paused it is probed every PAUSE_PROBE_SECONDS; a pause longer than
# PAUSE_ALERT_SECONDS mails the admin (and its end does too).
PAUSE_AFTER_FAILURES = 3
PAUSE_PROBE_SECONDS = 30.0
PAUSE_ALERT_SECONDS = 600.0

# Events out (CloudEvents 1.0): the ``source`` attribute, how long delivered events
# are kept, and the progress percentages that make a ``job.progress`` event.
EVENTS_SOURCE = "urn:watchfolder"
EVENTS_RETENTION_SECONDS = 7 * 86400.0
PROGRESS_MILESTONES = (25, 50, 75)
# Smaller jobs finish too fast for milestones to tell anyone anything.
PROGRESS_EVENT_MIN_BYTES = 64 * 1024**2
WEBHOOK_TIMEOUT = 10.0
# A sink failing without a break for this long is disabled (webhooks) and the admin told.
SINK_DISABLE_AFTER = 86400.0
SINK_BACKOFF = (1.0, 5.0, 30.0, 120.0, 600.0)
MQTT_PORT = 1883
MQTT_TOPIC_PREFIX = "watchfolder"

# The admin gets one digest instead of single failure mails once more than
# ADMIN_DIGEST_AFTER permanent failures arrive within ADMIN_DIGEST_MINUTES.
ADMIN_DIGEST_AFTER = 10
ADMIN_DIGEST_MINUTES = 10.0

#: Seconds a job waits (``retry_wait``, attempt not counted) before looking again when an
#: earlier job with the same content is still queued or running (watch.dedup): at first,
#: then a quarter of the time it has waited so far, at most DUPLICATE_WAIT_MAX.
DUPLICATE_WAIT_SECONDS = 2.0
DUPLICATE_WAIT_MAX = 60.0

# A lasting problem (store outage, data disk full) is logged when it starts, then
# reminded after these many seconds, the last repeated (store/outage.py, store/space.py).
PROBLEM_REMINDERS = (60.0, 120.0, 240.0, 480.0, 900.0)
