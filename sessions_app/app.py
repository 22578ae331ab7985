"""The Faust application, built from Settings; `main()` is the `sessions-app` console script."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import faust

from sessions_app.allocator import fix_mmap_threshold
from sessions_app.settings import Settings, SettingsError


def load_settings() -> Settings:
    """Read the settings, or stop with exit status 2 and one line naming the bad variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"sessions-app: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


settings = load_settings()

# Before RocksDB allocates anything: its memtable blocks must go back to the system.
fix_mmap_threshold()

# Records per fetch handed to the agent; with the fetches queued behind the
# one being applied, this bounds the fetched records a worker holds on its heap.
FETCH_MAX_RECORDS = 10_000
# Faust creates the data directory without its parents (Procfile: ./sessions-data/worker-$PORT).
Path(settings.data_dir).mkdir(parents=True, exist_ok=True)

# aiokafka builds a debug record for every message it sends (its loggers are left
# at NOTSET): that cost a tenth of the worker's CPU.
logging.getLogger("aiokafka").setLevel(logging.INFO)


class SessionsApp(faust.App):
    """A Faust app whose consumer hands the input topic over a fetch at a time."""

    def _new_consumer(self) -> Any:
        from sessions_app.intake import IntakeConsumer

        consumer = IntakeConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.transport.loop,
        )
        consumer.intake_topic = settings.input_topic
        # Enough fetches queued to fill the next batch, and no more.
        consumer.intake_depth = max(1, settings.batch_fragments // FETCH_MAX_RECORDS - 1)
        return consumer


app = SessionsApp(
    settings.app_id,
    broker=settings.broker_url,
    store="rocksdb://",
    datadir=settings.data_dir,
    topic_partitions=settings.partitions,
    # Never lose the start of a partition nobody has committed yet.
    consumer_auto_offset_reset="earliest",
    broker_session_timeout=settings.broker_session_timeout,
    broker_heartbeat_interval=settings.broker_heartbeat_interval,
    broker_request_timeout=max(90.0, settings.broker_session_timeout),
    producer_max_batch_size=settings.producer_max_batch_size,
    # A fetch is handed to the agent whole (sessions_app/intake.py): bound it, or fetched
    # records (half a kilobyte of Python objects each) pile up by the hundred thousand.
    broker_max_poll_records=FETCH_MAX_RECORDS,
    # Unacked fragments are read again after a restart; shutdown need not wait for them.
    stream_wait_empty=False,
    web_bind=settings.web_host,
    web_host=settings.web_host,
    web_port=settings.web_port,
    # Faust's /table/ views would publish session contents, /router/ the cluster layout.
    web_tables_enabled=False,
    web_router_enabled=False,
    web_stats_enabled=False,
    web_graph_enabled=False,
    TableManager="sessions_app.recovery:OrderedTableManager",
    # Standby replicas keep a copy of other workers' partitions warm for a fast takeover.
    table_standby_replicas=settings.standby_replicas,
    autodiscover=False,
)


def main() -> None:
    """Run the Faust command line: `sessions-app worker`, `broker`, `produce`, `verify`."""
    app.main()


# The wiring modules register agents, tables, views and commands on `app`.
from sessions_app import agents, commands, expiry, monitoring, views  # noqa: E402, F401
