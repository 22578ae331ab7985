"""The Faust application, built from Settings; `main()` is the `sessions-app` console script.

Importing this module reads the settings and builds objects, nothing more:
no thread, no connection, no directory, no process-wide setting. What a
worker needs changed in its process (glibc's mmap threshold, the data
directory, logger levels) happens when the app first starts.

The modules that register the agent and the commands import `app` and are
found by Faust's autodiscover (DISCOVERED); the web views are a blueprint
the web server loads by name (sessions_app.web.server). So nothing here
imports them back, and the package has no import circle.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import faust
from faust.types import TP
from mode import Service, ServiceT

from sessions_app.core.batch import Fragment
from sessions_app.core.limits import size_problem
from sessions_app.core.totals import PipelineTotals
from sessions_app.engine.allocator import fix_mmap_threshold, limit_arenas
from sessions_app.engine.intake import IntakeConsumer
from sessions_app.engine.recovery import OrderedRecovery, OrderedTableManager
from sessions_app.settings import Settings, SettingsError
from sessions_app.stream.broker import BrokerRefused, partition_counts, record_limits
from sessions_app.stream.delivery import Delivery
from sessions_app.stream.expiry import IdleExpiry
from sessions_app.stream.monitoring import CapacityMonitor, LoopStallMonitor
from sessions_app.stream.partitions import PartitionMonitor
from sessions_app.stream.pipeline import Pipeline
from sessions_app.stream.tables import declare_session_buffers
from sessions_app.stream.topics import copartitioning_problem, declare_topics
from sessions_app.web.census import SessionCensus
from sessions_app.web.heapstats import HeapSnapshots
from sessions_app.web.history import HistorySampler
from sessions_app.web.server import SessionsWeb

#: Modules that register agents and commands on `app`, imported by Faust's autodiscover.
DISCOVERED = ["sessions_app.stream.agents", "sessions_app.tools.commands"]


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Return Faust's credentials for the broker's security protocol, None for PLAINTEXT."""
    protocol = settings.broker_security_protocol
    if protocol == "SSL":
        return faust.SSLCredentials(settings.ssl_context())
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=settings.ssl_context() if protocol == "SASL_SSL" else None,
        )
    return None


def load_settings() -> Settings:
    """Read the settings, or stop with exit status 2 and one line naming the bad variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"sessions-app: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class SessionsApp(faust.App):
    """The worker: Faust's app with the session buffers, their pipeline and its services."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings.app_id,
            broker=settings.broker_url,
            broker_credentials=broker_credentials(settings),
            store="rocksdb://",
            datadir=settings.data_dir,
            topic_partitions=settings.partitions,
            # Never lose the start of a partition nobody has committed yet.
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=settings.broker_session_timeout,
            broker_heartbeat_interval=settings.broker_heartbeat_interval,
            broker_request_timeout=max(90.0, settings.broker_session_timeout),
            producer_max_batch_size=settings.producer_max_batch_size,
            # The client's own check on a dead letter or an alert: the topics' limits are
            # checked at start (core/limits.py), and a dead letter carries a whole fragment.
            producer_max_request_size=max(2 * 1024 * 1024, settings.max_buffer_bytes + 65536),
            # A fetch is handed to the agent whole (engine/intake.py): bound it, or fetched
            # records (half a kilobyte of Python objects each) pile up by the hundred thousand.
            broker_max_poll_records=settings.tuning.fetch_max_records,
            broker_commit_every=settings.tuning.commit_every,
            # Unacked fragments are read again after a restart; shutdown need not wait for them.
            stream_wait_empty=False,
            web_bind=settings.web_host,
            web_host=settings.web_advertised_host,
            web_port=settings.web_port,
            # Faust's /table/ views would publish session contents, /router/ the cluster layout.
            web_tables_enabled=False,
            web_router_enabled=False,
            web_stats_enabled=False,
            web_graph_enabled=False,
            TableManager="sessions_app.engine.recovery:OrderedTableManager",
            # Standby replicas keep a copy of other workers' partitions warm for a fast takeover.
            table_standby_replicas=settings.standby_replicas,
            autodiscover=DISCOVERED,
            # What discovery scans besides DISCOVERED; by default the script's name.
            origin=__name__,
        )
        self.settings = settings
        tuning = settings.tuning
        self.session_topics = declare_topics(self, settings)
        self.session_buffers = declare_session_buffers(self, settings)
        self.totals = PipelineTotals()
        self.delivery = Delivery(self, self.session_topics.dead_letters)
        self.capacity = CapacityMonitor(settings, self.delivery, self.session_topics.alerts)
        self.pipeline = Pipeline(
            self,
            settings,
            self.session_buffers,
            self.session_topics,
            self.delivery,
            self.totals,
            self.capacity,
        )
        self.heap_snapshots = HeapSnapshots(settings.heap_min_interval)
        self.census = SessionCensus(self.pipeline, settings)
        # Services started with the worker once its tables are recovered, stopped with it.
        self.idle_expiry = IdleExpiry(self, self.pipeline, settings)
        self.loop_stalls = LoopStallMonitor(tuning.stall_probe_period, tuning.stall_window)
        self.partition_monitor = PartitionMonitor(
            self,
            settings,
            self.pipeline,
            self.delivery,
            self.session_topics.alerts,
            self.capacity.worker,
        )
        self.history = HistorySampler(
            tuning.history_period,
            tuning.history_samples,
            settings.max_sessions,
            lambda: sum(self.pipeline.live_sessions().values()),
            self.heap_snapshots.last_size,
            lambda: self.pipeline.progress.totals(time.time()),
        )
        # Started once the tables are recovered; the stall probe starts with the app, since
        # /livez answers from the start and the loop turns through recovery too.
        self._sessions_services: list[Service] = [
            self.idle_expiry,
            self.partition_monitor,
            self.history,
        ]
        self._sessions_services_started = False

    def _new_consumer(self) -> IntakeConsumer:
        consumer = IntakeConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.transport.loop,
        )
        consumer.intake_topic = self.settings.input_topic
        consumer.intake_depth = self.settings.intake_depth
        consumer.changelog_topics = frozenset(
            {self.session_buffers.changelog_topic.get_topic_name()}
        )
        consumer.on_changelog = self._apply_changelog_fetch
        return consumer

    def _apply_changelog_fetch(self, tp: TP, records: list[Fragment]) -> None:
        recovery = cast(OrderedRecovery, cast(OrderedTableManager, self.tables).recovery)
        recovery.apply_fetched(tp, records)

    def _new_web(self) -> SessionsWeb:
        return SessionsWeb(self)

    def on_init_dependencies(self) -> Iterable[ServiceT]:
        """Start the event-loop stall probe with the app, beside Faust's own services."""
        return [*super().on_init_dependencies(), self.loop_stalls]

    async def on_first_start(self) -> None:
        """Prepare the process for a worker, before any table opens RocksDB."""
        # Recovery takes the session buffers' changelog a fetch at a time (engine/recovery.py);
        # a table of another kind would need its own path there.
        others = sorted(t.name for t in self.tables.values() if t is not self.session_buffers)
        if others:
            raise RuntimeError(f"tables {others}: recovery only applies the session buffers")
        # RocksDB's memtable blocks must go back to the system once freed, and what its
        # threads free must serve the others (engine/allocator.py).
        fix_mmap_threshold()
        limit_arenas()
        # Faust creates the data directory without its parents (Procfile: .../worker-$PORT).
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        # aiokafka builds a debug record for every message it sends (its loggers are left
        # at NOTSET): that cost a tenth of the worker's CPU.
        logging.getLogger("aiokafka").setLevel(logging.INFO)
        await self._preflight()
        await super().on_first_start()

    async def _preflight(self) -> None:
        """Stop with exit status 2 before consuming if the topics' partition counts disagree."""
        settings = self.settings
        changelog = self.session_buffers.changelog_topic.get_topic_name()
        names = [
            settings.input_topic,
            changelog,
            settings.output_topic,
            settings.expired_topic,
        ]
        try:
            counts = await partition_counts(settings, names)
        except BrokerRefused as refused:
            print(f"sessions-app: {refused}", file=sys.stderr, flush=True)
            raise SystemExit(refused.exit_status) from None
        problem = copartitioning_problem(settings, changelog, counts)
        if problem is not None:
            print(f"sessions-app: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        # Kafka refuses a record batch above the topic's max.message.bytes, and the test
        # broker never does: know it here, before a record is refused in production.
        kinds = {"output": settings.output_topic, "expired": settings.expired_topic}
        limits = await record_limits(settings, [*kinds.values(), changelog, settings.dlq_topic])
        self.delivery.dead_letter_limit = limits[settings.dlq_topic]
        too_large = size_problem(
            settings.max_buffer_bytes,
            settings.delimiter,
            settings.producer_max_batch_size,
            {
                **{kind: (name, limits[name]) for kind, name in kinds.items()},
                "changelog": (changelog, limits[changelog]),
            },
        )
        if too_large is not None:
            variable, why = too_large
            value = getattr(settings, variable.removeprefix("SESSIONS_").lower())
            print(f"sessions-app: {SettingsError(variable, str(value), why)}", file=sys.stderr)
            raise SystemExit(2)

    async def on_started_init_extra_services(self) -> None:
        """Start the sessions services once the tables are recovered, as Faust's timers start."""
        await super().on_started_init_extra_services()
        if not self._sessions_services_started:
            self._sessions_services_started = True
            # What the worker built to start lives as long as it does: keep it out of the
            # collector's full passes, each of which would otherwise walk all of it with the
            # event loop stopped (60-100 ms here).
            gc.collect()
            gc.freeze()
            for service in self._sessions_services:
                await self.add_runtime_dependency(service)


app = SessionsApp(load_settings())


def main() -> None:
    """Run the Faust command line: `sessions-app worker`, `broker`, `produce`, `verify`."""
    app.main()
