"""``/metrics`` of a ``--workers N`` group: one scrape of the shared port sees every worker.

The workers share one port, so the kernel hands each scrape to any one of them. Rather
than prometheus_client's multiprocess mode (its files only hold values kept in
prometheus_client objects, while pricehub reads live objects at scrape time: open
sockets, storage state; every metric would have to be rewritten onto the hot path, and
each gauge given a cross-process aggregation), the worker that gets the scrape asks its
siblings for their own expositions and answers with all of them:

* each worker also serves its own exposition (OpenMetrics, which parses back without
  loss) on a private Unix socket, ``worker-<index>.sock`` in a directory the parent
  created with mode 0700: unreachable from the network, and no operator key needed;
* ``/metrics`` fetches the siblings' expositions concurrently, ``SIBLING_TIMEOUT``
  each, and labels every sample with ``worker="<index>"`` (its own too), so no series
  is counted twice and ``sum without (worker)`` gives the group;
* a sibling that does not answer in time (restarting, stalled loop) is left out of that
  scrape and counted in ``pricehub_metrics_workers_missing``: its series miss one scrape
  instead of being wrong.

A single process (``--workers 1``) has no group, and its ``/metrics`` is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.parser import text_string_to_metric_families

__all__ = [
    "OWN_PATH", "SIBLING_TIMEOUT", "WORKERS_MISSING", "WORKER_GROUP", "WorkerGroup",
    "gather", "serve_own",
]

WORKERS_MISSING = "pricehub_metrics_workers_missing"
SIBLING_TIMEOUT = 1.0  # seconds per sibling, all asked at once; Prometheus's default is 10 s
OWN_PATH = "/worker-metrics"  # on the private socket only, never on the public port


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """This worker's place in the group: its index, how many there are, and the private
    directory (mode 0700, made by the parent) holding every worker's socket."""

    index: int
    count: int
    socket_dir: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.socket_dir, f"worker-{index}.sock")

    def siblings(self) -> list[int]:
        return [index for index in range(self.count) if index != self.index]


WORKER_GROUP = web.AppKey("worker_group", WorkerGroup)

Exposition = Callable[[], Awaitable[bytes]]


@contextlib.asynccontextmanager
async def serve_own(group: WorkerGroup, exposition: Exposition) -> AsyncIterator[None]:
    """Serve this worker's own OpenMetrics exposition on its private socket while the
    context is open (the application's life). A restarted worker takes over the stale
    socket file of its predecessor (asyncio removes it before binding)."""

    async def own(request: web.Request) -> web.Response:
        return web.Response(body=await exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    private = web.Application()
    private.router.add_get(OWN_PATH, own)
    runner = web.AppRunner(private, access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, group.socket_path(group.index)).start()
        yield
    finally:
        await runner.cleanup()


async def gather(group: WorkerGroup, own: Iterable[Metric]) -> list[Metric]:
    """This worker's families plus every sibling's that answered, each sample labelled
    with its worker, one family per name; and the count of siblings missing."""
    siblings = group.siblings()
    answers = await asyncio.gather(*(fetch(group.socket_path(index)) for index in siblings))
    merged: dict[str, Metric] = {}
    add_worker(merged, own, group.index)
    for index, families in zip(siblings, answers, strict=True):
        if families is not None:
            add_worker(merged, families, index)
    missing = sum(families is None for families in answers)
    merged[WORKERS_MISSING] = GaugeMetricFamily(
        WORKERS_MISSING,
        f"Sibling workers that did not answer this scrape within {SIBLING_TIMEOUT:g} s "
        "(their series are absent from it).",
        value=missing,
    )
    return list(merged.values())


def add_worker(merged: dict[str, Metric], families: Iterable[Metric], worker: int) -> None:
    """Append ``families``' samples, labelled ``worker``, to the merged family of each name
    (HELP and TYPE come from the first worker that has it)."""
    label = str(worker)
    for family in families:
        target = merged.get(family.name)
        if target is None:
            target = merged[family.name] = Metric(
                family.name, family.documentation, family.type, family.unit
            )
        target.samples.extend(
            sample._replace(labels={**sample.labels, "worker": label})
            for sample in family.samples
        )


async def fetch(path: str) -> list[Metric] | None:
    """A sibling's families, or None when it does not answer (in time, or sensibly)."""
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT), aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=path)
        ) as session, session.get("http://worker" + OWN_PATH) as response:
            response.raise_for_status()
            text = await response.text()
        return list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
