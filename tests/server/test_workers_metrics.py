"""``--workers N``: one scrape of the shared port returns the whole group's metrics.

A real ``--workers 2`` server on a real Redis, scraped directly and by a real Prometheus;
and a sibling that does not answer in time, left out and counted.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pricehub.server.http.group_metrics import (
    SIBLING_TIMEOUT,
    WORKERS_MISSING,
    WorkerGroup,
    gather,
)
from pricehub.server.http.metrics import REGISTRY
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import ServerProcess, free_port
from tests.harness.support import WAIT, MakeClient, missing_tool

SOCKETS = 6  # WebSocket connections opened through the shared port
SLOW = 30.0  # Prometheus start-up plus a few 1 s scrapes on a shared 2-core machine


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.fixture
async def group(redis_server: RedisProcess) -> AsyncIterator[ServerProcess]:
    server = ServerProcess("--workers", "2", "--no-simulate", redis_url=redis_server.url)
    await server.start_async()
    try:
        yield server
    finally:
        await server.stop_async()


async def get_metrics(url: str) -> tuple[str, dict[str, list[Any]]]:
    """One scrape on a fresh connection (so the kernel may pick either worker): the
    raw text and the samples by name."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(
        url + "/metrics", timeout=aiohttp.ClientTimeout(total=WAIT)
    ) as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return text, samples


async def whole_group(url: str) -> tuple[str, dict[str, list[Any]]]:
    """A scrape that has both workers (right after start the sibling's private socket
    may not be up yet; bounded wait)."""
    deadline = time.monotonic() + WAIT
    while True:
        text, samples = await get_metrics(url)
        workers = {s.labels.get("worker") for s in samples.get("pricehub_info", [])}
        if workers == {"0", "1"}:
            return text, samples
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.1)


class Sockets:
    """``count`` WebSockets, each on its own connection: the kernel spreads them."""

    def __init__(self) -> None:
        self.sessions: list[aiohttp.ClientSession] = []
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []  # kept open

    async def open(self, server: ServerProcess, count: int) -> None:
        for _ in range(count):
            session = aiohttp.ClientSession()
            self.sessions.append(session)
            ws = await session.ws_connect(server.ws_url + "/api/ws/ws/market/pjm")
            self.sockets.append(ws)
            assert (await ws.receive_json(timeout=WAIT))["type"] == "connection_established"

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets))
        await asyncio.gather(*(session.close() for session in self.sessions))


async def open_sockets(server: ServerProcess, count: int) -> Sockets:
    sockets = Sockets()
    try:
        await sockets.open(server, count)
    except BaseException:
        await sockets.close()
        raise
    return sockets


async def test_every_scrape_of_the_port_shows_both_workers(group: ServerProcess) -> None:
    sessions = await open_sockets(group, SOCKETS)
    try:
        await whole_group(group.url)
        answered: set[str] = set()
        for attempt in range(40):  # until both workers answered at least 3 scrapes
            text, samples = await get_metrics(group.url)
            info = samples["pricehub_info"]
            assert sorted(s.labels["worker"] for s in info) == ["0", "1"], text
            assert len({s.labels["instance_id"] for s in info}) == 2
            # every sample carries its worker, the group gauge excepted
            unlabelled = {n for n, ss in samples.items() for s in ss if "worker" not in s.labels}
            assert unlabelled == {WORKERS_MISSING}
            assert samples[WORKERS_MISSING][0].value == 0
            open_now = samples["pricehub_connections_open"]
            assert sum(s.value for s in open_now) == SOCKETS
            assert text.count("# TYPE pricehub_connections_open gauge") == 1
            answered.add(info[0].labels["worker"])  # the answering worker comes first
            if answered == {"0", "1"} and attempt >= 5:
                break
        assert answered == {"0", "1"}  # either worker answers for the whole group
    finally:
        await sessions.close()


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        missing_tool("prometheus not installed (Debian package 'prometheus')")
    return found


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[Any] | None:
    """The result vector of an instant query, or None while Prometheus is not up."""
    try:
        async with session.get(base + "/api/v1/query", params={"query": promql}) as response:
            if response.status != 200:
                return None
            body = await response.json()
    except aiohttp.ClientError:
        return None
    result: list[Any] = body["data"]["result"]
    return result


async def test_prometheus_sees_the_whole_group_through_one_target(
    group: ServerProcess, tmp_path: Path
) -> None:
    prometheus = prometheus_binary()
    sessions = await open_sockets(group, SOCKETS)
    await whole_group(group.url)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: pricehub\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{group.port}']\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + SLOW
            while True:
                by_worker = await query(session, base, "count by (worker) (pricehub_info)")
                if by_worker is not None and len(by_worker) == 2:
                    break
                assert process.returncode is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, (by_worker, group.log())
                await asyncio.sleep(0.2)
            assert {r["metric"]["worker"] for r in by_worker} == {"0", "1"}
            targets = await query(session, base, 'count(up{job="pricehub"} == 1)')
            assert targets is not None and float(targets[0]["value"][1]) == 1  # one target
            opened = await query(session, base, "sum(pricehub_connections_open)")
            assert opened is not None and float(opened[0]["value"][1]) == SOCKETS
            instances = await query(session, base, "count(count by (instance) (pricehub_info))")
            assert instances is not None and float(instances[0]["value"][1]) == 1
    finally:
        process.terminate()  # by its PID: the process this test started
        try:
            await asyncio.wait_for(process.wait(), WAIT)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.close()
        await sessions.close()


async def test_a_silent_sibling_is_left_out_and_counted(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """A sibling whose socket accepts but never answers (a stalled loop) costs one
    ``SIBLING_TIMEOUT`` and is counted; one with no socket at all (restarting) too."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the scraper gives up

    me = WorkerGroup(0, 3, str(tmp_path))
    server = await asyncio.start_unix_server(silent, me.socket_path(1))  # worker 2: none
    try:
        client = await make_client()
        own = list(client.server.app[REGISTRY].collect())
        started = time.monotonic()
        families = {family.name: family for family in await gather(me, own)}
        elapsed = time.monotonic() - started
    finally:
        server.close()
        await server.wait_closed()
    assert SIBLING_TIMEOUT <= elapsed < SIBLING_TIMEOUT + 2
    assert families[WORKERS_MISSING].samples[0].value == 2
    info = families["pricehub_info"].samples
    assert [s.labels["worker"] for s in info] == ["0"]


async def _publish_status(server: ServerProcess, key: str) -> int:
    """One publish on a fresh connection (the kernel picks a worker): its HTTP status."""
    body = [{"market_zone": "pjm", "price": 1.0, "timestamp": "2026-01-01T00:00:00Z"}]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.post(
        server.url + "/api/ws/ws/broadcast/price", json=body,
        headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=WAIT),
    ) as response:  # fmt: skip
        return response.status


async def test_a_worker_never_numbers_alone_while_redis_is_away() -> None:
    """The workers of ``--workers 2`` share the port and one Redis, so each has peers from
    its first price: with Redis gone, a publish is held (then refused, 503), never numbered
    in one worker's memory alone, where its sibling would number the same seqs. (Each
    worker used to be handed ``workers=1`` settings and so did not assume peers: one that
    had not yet seen its sibling in the registry numbered alone, and the lineage forked;
    found at 40,000 subscribers, where loop stalls made Redis time out.)"""
    key = "k" * 16
    with RedisProcess() as redis:
        server = ServerProcess(
            "--workers", "2", "--no-simulate", "--redis-hold", "1",
            publish_key=key, redis_url=redis.url,
        )  # fmt: skip
        await server.start_async()
        try:
            redis.kill()  # right after start: a worker may not have seen its sibling yet
            statuses = await asyncio.gather(*(_publish_status(server, key) for _ in range(8)))
        finally:
            await server.stop_async()
    assert sorted(set(statuses)) == [503], statuses
