"""Prometheus ``/metrics``: one registry per application, read from plain counters.

The fan-out path only bumps plain integers on the objects that own them (connections,
broadcaster, stats, publisher, storage); nothing there calls into ``prometheus_client``.
A custom collector reads those integers when Prometheus scrapes, so a scrape costs one
pass over the open connections on the loop (plus the ``process_*`` metrics, read in a
thread) and a message costs nothing extra. The only native
prometheus metric is the publish-to-send latency histogram, observed once per flushed
event-loop tick (not per message or per client). The delivery-lag histogram
(``pricehub_delivery_lag_seconds``: accepted_at to the write, per transport) is kept as
plain bucket counts by the broadcaster (``fanout/lag.py``) and exported by
``DeliveryLagCollector``.

Every metric is declared once in ``METRICS`` (name, type, help, labels, how to read it);
``docs/operations.md`` lists the same names and a test keeps the two in step.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.registry import Collector

from pricehub import __version__
from pricehub.server.fanout.broadcaster import Broadcaster
from pricehub.server.http.group_metrics import WORKER_GROUP, gather, serve_own
from pricehub.server.keys import (
    BROADCASTER,
    INGEST_STATS,
    INSTANCE_ID,
    LIMITS,
    PUBLISHER,
    SETTINGS,
    STATS,
    STORAGE,
)
from pricehub.server.policy.admission import ConnectionLimits
from pricehub.server.publisher import SOURCES, Publisher
from pricehub.server.settings import Settings
from pricehub.server.stats import ConnectionTotals, IngestStats, Stats, redis_required
from pricehub.storage import DiskStatus, JournalStats, Storage, StorageCounters
from pricehub.wire import paths
from pricehub.wire.codes import Backend, DisconnectReason

__all__ = [
    "DELIVERY_LAG", "LATENCY_BUCKETS", "METRICS", "PROCESS_METRICS", "REGISTRY",
    "DeliveryLagCollector", "Families", "MetricSpec", "PricehubCollector", "ProcessMetrics",
    "Sources", "add_routes",
]

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
BACKENDS = tuple(Backend)
# Publish-to-send happens within one or a few loop iterations: sub-millisecond when all
# is well, so the buckets are fine there and coarse up to the seconds of a stalled loop.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)

Sample = tuple[tuple[str, ...], float]


@dataclass(frozen=True, slots=True)
class Sources:
    """What one scrape reads: the application's objects, looked up once."""

    broadcaster: Broadcaster
    stats: Stats
    publisher: Publisher
    storage: Storage
    settings: Settings
    limits: ConnectionLimits
    instance_id: str
    open: ConnectionTotals
    counters: StorageCounters  # the storage's, typed: a renamed one is a type error
    disk: DiskStatus
    ingest: IngestStats  # the Redis ingest consumer's (all zero without it)

    @classmethod
    def from_app(cls, app: web.Application) -> Sources:
        broadcaster, storage = app[BROADCASTER], app[STORAGE]
        return cls(
            broadcaster=broadcaster, stats=app[STATS], publisher=app[PUBLISHER],
            storage=storage, settings=app[SETTINGS], limits=app[LIMITS],
            instance_id=app[INSTANCE_ID],
            open=ConnectionTotals.measure(broadcaster.connections),
            counters=storage.counters(),
            disk=storage.disk_status(),
            # The ingest's own counters, when it runs (with Redis only).
            ingest=app.get(INGEST_STATS) or IngestStats(),
        )


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One exposed metric: Prometheus name (counters end in ``_total``), type, help,
    label names, and how to read its samples from a scrape's ``Sources``."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    read: Callable[[Sources], Iterable[Sample]]
    labels: tuple[str, ...] = ()

    def family(self, samples: Iterable[Sample] = ()) -> Metric:
        family: CounterMetricFamily | GaugeMetricFamily
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.help, labels=self.labels)
        else:
            family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        for labels, value in samples:
            family.add_metric(list(labels), value)
        return family


def scalar(read: Callable[[Sources], float]) -> Callable[[Sources], Iterable[Sample]]:
    return lambda sources: [((), read(sources))]


def by_key(counter: Counter[str], preset: Iterable[str] = ()) -> list[Sample]:
    """One sample per key; ``preset`` keys appear at 0 before their first event so a
    rate() over them works from the start."""
    keys = dict.fromkeys(preset) | dict.fromkeys(sorted(counter))
    return [((key,), counter[key]) for key in keys]


def accepted_prices(sources: Sources) -> list[Sample]:
    accepted = sources.publisher.accepted
    keys = dict.fromkeys(
        (zone, source) for zone in sources.settings.zones for source in SOURCES
    ) | dict.fromkeys(sorted(accepted))
    return [(key, accepted[key]) for key in keys]


def zone_subscribers(sources: Sources) -> list[Sample]:
    # Every configured zone, 0 included (the broadcaster keeps only subscribed ones).
    subscribers = sources.broadcaster.subscribers
    return [((zone,), len(subscribers.get(zone, ()))) for zone in sources.settings.zones]


def storage_backend(sources: Sources) -> list[Sample]:
    current = sources.storage.backend
    return [((backend,), float(backend == current)) for backend in BACKENDS]


def journal_sample(
    read: Callable[[JournalStats], float | None],
) -> Callable[[Sources], Iterable[Sample]]:
    """One sample read from the journal's stats; none without a journal (data dir
    ``none``, or a backend that keeps none) or while the value is unknown."""

    def samples(sources: Sources) -> list[Sample]:
        journal = sources.disk.journal
        found = None if journal is None else read(journal)
        return [] if found is None else [((), float(found))]

    return samples


def journal_info(sources: Sources) -> list[Sample]:
    journal = sources.disk.journal
    return [] if journal is None else [((journal.data_dir,), 1.0)]


def journal_available(sources: Sources) -> list[Sample]:
    status = sources.disk
    return [] if status.journal is None else [((), float(status.ok))]


def journal_write_errors(sources: Sources) -> list[Sample]:
    status = sources.disk
    return [] if status.journal is None else [((), float(status.write_errors))]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "pricehub_info", "gauge", "Always 1; labels identify this instance.",
        lambda s: [((__version__, s.instance_id), 1.0)], ("version", "instance_id"),
    ),
    # --- connections
    MetricSpec(
        "pricehub_connections_open", "gauge", "Open WebSocket connections.",
        scalar(lambda s: len(s.broadcaster.connections)),
    ),
    MetricSpec(
        "pricehub_connections_open_by_transport", "gauge",
        "Open connections by transport: WebSocket (ws) or Server-Sent Events stream (sse).",
        lambda s: [((transport,), n) for transport, n in
                   s.broadcaster.connections_by_transport().items()],
        ("transport",),
    ),
    MetricSpec(
        "pricehub_zone_subscribers", "gauge",
        "Open WebSocket connections subscribed to the zone (a multi-zone socket counts "
        "once in each of its zones).",
        zone_subscribers, ("zone",),
    ),
    MetricSpec(
        "pricehub_zones_stale", "gauge",
        "Zones announced stale: no accepted price for --stale-after seconds (0 when off).",
        scalar(lambda s: len(s.broadcaster.stale_zones())),
    ),
    MetricSpec(
        "pricehub_connections_limit", "gauge",
        "Configured maximum of open WebSocket connections (--max-connections).",
        scalar(lambda s: s.limits.total),
    ),
    MetricSpec(
        "pricehub_connections_accepted_total", "counter",
        "WebSocket connections admitted (after origin, limit, token and zone checks).",
        scalar(lambda s: s.stats.total_connections),
    ),
    MetricSpec(
        "pricehub_connections_rejected_total", "counter",
        "WebSocket upgrades refused at admission, by reason (origin, limit_total, "
        "limit_per_ip, auth, unknown_zone, forbidden_zone, too_many_zones).",
        lambda s: by_key(s.stats.rejected_connections), ("reason",),
    ),
    MetricSpec(
        "pricehub_disconnections_total", "counter",
        "Admitted WebSocket connections that ended, by reason.",
        lambda s: by_key(s.stats.disconnections, tuple(DisconnectReason)), ("reason",),
    ),
    MetricSpec(
        "pricehub_connection_errors_total", "counter",
        "Connections ended by an internal server error (close 1011).",
        scalar(lambda s: s.stats.connection_errors),
    ),
    # --- messages
    MetricSpec(
        "pricehub_messages_sent_total", "counter",
        "WebSocket frames written to clients (server pings included).",
        scalar(lambda s: s.stats.closed_messages_sent + s.open.messages_sent),
    ),
    MetricSpec(
        "pricehub_messages_received_total", "counter",
        "Text and binary frames received from clients.",
        scalar(lambda s: s.stats.closed_messages_received + s.open.messages_received),
    ),
    MetricSpec(
        "pricehub_client_errors_total", "counter",
        "error messages sent to clients, by error code.",
        lambda s: by_key(s.stats.protocol_errors), ("code",),
    ),
    # --- prices
    MetricSpec(
        "pricehub_price_updates_accepted_total", "counter",
        "Prices accepted by this instance and given a seq, by zone and source "
        "(http, redis-ingest, simulator).",
        accepted_prices, ("zone", "source"),
    ),
    MetricSpec(
        "pricehub_price_updates_broadcast_total", "counter",
        "Prices received from the storage for fan-out (from every instance of the cluster).",
        scalar(lambda s: s.broadcaster.updates_broadcast),
    ),
    MetricSpec(
        "pricehub_ingest_invalid_total", "counter",
        "Redis ingest entries dropped as invalid (logged and acknowledged).",
        scalar(lambda s: s.ingest.invalid),
    ),
    MetricSpec(
        "pricehub_ingest_leases_total", "counter",
        "Times this instance became the cluster's ingest consumer.",
        scalar(lambda s: s.ingest.leases),
    ),
    MetricSpec(
        "pricehub_ingest_claimed_total", "counter",
        "Pending ingest entries taken over from a previous consumer.",
        scalar(lambda s: s.ingest.claimed),
    ),
    # --- send path
    MetricSpec(
        "pricehub_send_buffer_bytes", "gauge",
        "Bytes written but not yet accepted by the kernel, summed over open sockets.",
        scalar(lambda s: s.open.buffered_bytes),
    ),
    MetricSpec(
        "pricehub_send_buffer_max_bytes", "gauge",
        "Unsent bytes of the most backlogged open socket.",
        scalar(lambda s: s.open.max_buffered_bytes),
    ),
    MetricSpec(
        "pricehub_slow_consumers", "gauge",
        "Open sockets currently conflating (over the send high-water mark).",
        scalar(lambda s: s.open.conflating),
    ),
    MetricSpec(
        "pricehub_slow_consumer_conflations_total", "counter",
        "Times a socket started conflating: only the newest price per zone kept for it.",
        scalar(lambda s: s.broadcaster.conflation_events),
    ),
    MetricSpec(
        "pricehub_slow_consumer_closes_total", "counter",
        "Sockets closed with 4008 for staying too slow (hard limit or lag timeout).",
        scalar(lambda s: s.broadcaster.slow_consumer_closes),
    ),
    # --- storage
    MetricSpec(
        "pricehub_storage_backend", "gauge", "1 for the storage backend serving now, else 0.",
        storage_backend, ("backend",),
    ),
    MetricSpec(
        "pricehub_redis_required", "gauge",
        "1 when serving from memory is a degradation: a Redis URL was given, or Redis has "
        "served at the default one; 0 for --redis-url none and the embedded default.",
        scalar(lambda s: float(redis_required(s.settings, failovers=s.counters.failovers))),
    ),
    MetricSpec(
        "pricehub_storage_failovers_total", "counter",
        "Switches from Redis to the in-memory fallback.",
        scalar(lambda s: s.counters.failovers),
    ),
    MetricSpec(
        "pricehub_storage_recoveries_total", "counter",
        "Switches back from the in-memory fallback to Redis.",
        scalar(lambda s: s.counters.recoveries),
    ),
    MetricSpec(
        "pricehub_redis_errors_total", "counter",
        "Redis operations and probes that failed (errors and timeouts).",
        scalar(lambda s: s.counters.redis_errors),
    ),
    MetricSpec(
        "pricehub_storage_gaps_total", "counter",
        "Prices from Redis that arrived after a hole its history could not fill.",
        scalar(lambda s: s.counters.gaps),
    ),
    MetricSpec(
        "pricehub_storage_holds_total", "counter",
        "Redis outages during which this instance held publishes instead of numbering "
        "alone (it has peers).",
        scalar(lambda s: s.counters.holds),
    ),
    MetricSpec(
        "pricehub_storage_held_refusals_total", "counter",
        "Publishes refused (503) because Redis stayed away longer than --redis-hold.",
        scalar(lambda s: s.counters.held_refusals),
    ),
    MetricSpec(
        "pricehub_storage_resyncs_total", "counter",
        "Reconciles with Redis because the epoch moved (a peer declared a divergence, or "
        "Redis lost its data), appends held meanwhile: not failovers.",
        scalar(lambda s: s.counters.resyncs),
    ),
    MetricSpec(
        "pricehub_storage_foreign_messages_total", "counter",
        "Messages on this feed's Redis channel that were not its prices (another feed's "
        "lineage, or not a price at all): dropped, never delivered, logged (throttled).",
        scalar(lambda s: s.counters.foreign_messages),
    ),
    MetricSpec(
        "pricehub_epoch_changes_total", "counter",
        "Seq numbering lineage changes: history lost, clients cannot resume across it.",
        scalar(lambda s: s.counters.epoch_changes),
    ),
    # --- background work
    MetricSpec(
        "pricehub_reaper_runs_total", "counter", "Passes of the heartbeat reaper.",
        scalar(lambda s: s.stats.reaper_runs),
    ),
    MetricSpec(
        "pricehub_reaper_closes_total", "counter",
        "Sockets the heartbeat reaper closed with 4000.",
        scalar(lambda s: s.stats.reaper_closes),
    ),
    MetricSpec(
        "pricehub_event_loop_lag_seconds", "gauge",
        "Latest event-loop lag sample: how late a timer fired.",
        scalar(lambda s: s.stats.loop_lag),
    ),
    MetricSpec(
        "pricehub_event_loop_lag_max_seconds", "gauge",
        "Worst event-loop lag sample of the last 10 seconds (what health checks).",
        scalar(lambda s: s.stats.max_loop_lag()),
    ),
    MetricSpec(
        "pricehub_shutting_down", "gauge", "1 once graceful shutdown has started.",
        scalar(lambda s: float(s.stats.shutting_down)),
    ),
    # --- durability of the in-memory store (absent with --data-dir none)
    MetricSpec(
        "pricehub_journal_info", "gauge", "Always 1; data_dir is where the journal is kept.",
        journal_info, ("data_dir",),
    ),
    MetricSpec(
        "pricehub_journal_available", "gauge",
        "1 while journal writes succeed; 0 after a failed one (publishes answer 503).",
        journal_available,
    ),
    MetricSpec(
        "pricehub_journal_bytes", "gauge", "Bytes of the journal's database and its WAL.",
        journal_sample(lambda j: j.bytes_on_disk),
    ),
    MetricSpec(
        "pricehub_journal_last_snapshot_timestamp_seconds", "gauge",
        "Unix time of the last checkpoint (absent until the first one of this process).",
        journal_sample(lambda j: j.last_snapshot_at),
    ),
    MetricSpec(
        "pricehub_journal_fsync_last_seconds", "gauge",
        "Duration of the latest journal commit (one fsync of the WAL per transaction).",
        journal_sample(lambda j: j.fsync_last_seconds),
    ),
    MetricSpec(
        "pricehub_journal_fsync_max_seconds", "gauge",
        "Longest journal commit since start.",
        journal_sample(lambda j: j.fsync_max_seconds),
    ),
    MetricSpec(
        "pricehub_journal_fsyncs_total", "counter",
        "Journal commits: transactions, each covering every price queued meanwhile.",
        journal_sample(lambda j: j.fsyncs),
    ),
    MetricSpec(
        "pricehub_journal_write_errors_total", "counter",
        "Journal batches that failed to write (their publishes answered 503).",
        journal_write_errors,
    ),
)


class PricehubCollector(Collector):
    """Reads ``METRICS`` from one application at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def describe(self) -> Iterator[Metric]:
        # Names only: the registry checks for duplicates without reading the app.
        for spec in METRICS:
            yield spec.family()

    def collect(self) -> Iterator[Metric]:
        sources = Sources.from_app(self._app)
        for spec in METRICS:
            yield spec.family(spec.read(sources))


DELIVERY_LAG = "pricehub_delivery_lag_seconds"


class DeliveryLagCollector(Collector):
    """``pricehub_delivery_lag_seconds{transport}`` from the broadcaster's bucket counts
    (both transports always, 0 before their first delivery)."""

    HELP = (
        "Seconds from a price's accepted_at to the write of it to the sockets, per "
        "transport: one observation per shared write of an audience and zone (the zone's "
        "oldest price in it), weighted by the sockets written."
    )

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(DELIVERY_LAG, self.HELP, labels=("transport",))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(DELIVERY_LAG, self.HELP, labels=("transport",))
        for transport, histogram in self._app[BROADCASTER].delivery_lag.items():
            family.add_metric([transport], histogram.cumulative(), histogram.total)
        yield family


class ProcessMetrics(Collector):
    """``process_*`` metrics (CPU, memory, file descriptors), gathered off the loop.

    ``ProcessCollector`` lists ``/proc/self/fd``: one entry per socket, about a
    microsecond each, so tens of milliseconds at 50k connections. The scrape handler
    calls ``refresh`` in a thread; ``collect`` only hands out what it gathered.
    """

    def __init__(self) -> None:
        self._source = ProcessCollector(registry=None)
        self._families: list[Metric] = []

    def refresh(self) -> None:
        self._families = list(self._source.collect())

    def describe(self) -> Iterator[Metric]:
        return iter(())  # empty where /proc is missing: no fixed names to register

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


PROCESS_METRICS = web.AppKey("process_metrics", ProcessMetrics)


def latency_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "pricehub_publish_to_send_latency_seconds",
        "Seconds from the first price of an event-loop tick reaching the broadcaster to "
        "the write of that tick's frames (one observation per flushed tick).",
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )


class Families(Collector):
    """Already gathered families, to hand to an encoder as a registry."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def own_registry(app: web.Application) -> CollectorRegistry:
    """This process's registry, its ``process_*`` metrics refreshed (off the loop)."""
    await asyncio.to_thread(app[PROCESS_METRICS].refresh)
    return app[REGISTRY]


async def metrics_handler(request: web.Request) -> web.Response:
    """The text format 0.0.4 by default; OpenMetrics when the scraper asks for it (as
    Prometheus does), negotiated like prometheus_client's own exporters. In a
    ``--workers N`` group, every worker's metrics (``group_metrics``)."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    registry = await own_registry(request.app)
    group = request.app.get(WORKER_GROUP)
    if group is not None:
        families = await gather(group, list(registry.collect()))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Families(families))
    return web.Response(body=encode(registry), headers={"Content-Type": content_type})


async def group_member(app: web.Application) -> AsyncIterator[None]:
    """In a worker group, serve this worker's own exposition on its private socket."""
    group = app.get(WORKER_GROUP)  # set by the runner before start-up, if at all
    if group is None:
        yield
        return

    async def exposition() -> bytes:
        registry = await own_registry(app)
        body: bytes = openmetrics_latest(registry)  # type: ignore[no-untyped-call]
        return body

    async with serve_own(group, exposition):
        yield


def add_routes(app: web.Application) -> None:
    """A registry for this application only (test apps never share series), the process
    metrics, pricehub's collector, the latency histogram and ``GET /metrics``."""
    registry = app[REGISTRY] = CollectorRegistry(auto_describe=True)
    process = app[PROCESS_METRICS] = ProcessMetrics()
    registry.register(process)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(PricehubCollector(app))
    registry.register(DeliveryLagCollector(app))
    histogram = latency_histogram(registry)

    async def install_latency_observer(app: web.Application) -> None:
        app[BROADCASTER].observe_latency = histogram.observe

    app.on_startup.append(install_latency_observer)
    app.cleanup_ctx.append(group_member)
    app.router.add_get(paths.METRICS, metrics_handler)
