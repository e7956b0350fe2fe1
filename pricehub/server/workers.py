"""``--workers N``: N server processes on one port (SO_REUSEPORT), one cluster via Redis.

Each worker is a full instance (``pricehub.server.serve(..., reuse_port=True)``) in its
own process, started with ``spawn`` so no event loop or socket leaks across a fork.
The kernel spreads new connections over the workers; Redis makes them one cluster
(seqs, fan-out, registry), exactly as separate hosts behind a load balancer would be.
That is why workers need a reachable Redis at start: without it each worker would
number prices alone and a client would see a different feed per connection.

The parent supervises: SIGTERM/SIGINT are passed on as SIGTERM (each worker then shuts
down gracefully, closing its sockets with 1001), a worker that crashes is restarted,
and one that crashes right after starting stops the whole group instead of looping.
It also makes the private directory (mode 0700) where each worker serves its own
metrics on a Unix socket, so that one scrape of the port returns the whole group's
(``pricehub.server.http.group_metrics``); it removes the directory at the end.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog

from pricehub.server.http.group_metrics import WorkerGroup
from pricehub.server.settings import Settings
from pricehub.storage import redis_problem as ping_problem

__all__ = ["run_workers"]

log = structlog.get_logger("pricehub.workers")

CRASH_LOOP_SECONDS = 5.0  # a worker dying sooner after its start is not restarted
STOP_MARGIN = 5.0  # seconds on top of shutdown_grace before a worker is killed


def run_workers(settings: Settings) -> int:
    """Serve with ``settings.workers`` processes; returns the exit code (2: refused)."""
    from pricehub.server.logs import redact_text
    from pricehub.server.runner import BindError, bind_sockets

    try:  # the port first, as a single process does: refused before anything starts
        for sock in bind_sockets(settings.host, settings.port, reuse_port=True):
            sock.close()
    except BindError as exc:
        print(f"pricehub: {exc}", file=sys.stderr)
        return 2
    problem = redis_problem(settings)
    if problem is not None:
        print(redact_text(
            f"pricehub: --workers {settings.workers} needs a reachable Redis to form a "
            f"cluster, and {settings.redis_url!r} is not: {problem}"
        ), file=sys.stderr)
        return 2
    if settings.port == 0:
        print("pricehub: --workers needs a fixed --port (0 gives each worker its own)",
              file=sys.stderr)
        return 2
    return _Supervisor(settings).run()


def redis_problem(settings: Settings) -> str | None:
    """Why the configured Redis cannot be used right now, or None if it answers PING."""
    if settings.redis_url is None:
        return "no Redis configured (--redis-url none)"
    return asyncio.run(
        ping_problem(settings.redis_url, timeout=max(settings.redis_timeout, 1.0))
    )


def _serve_worker(settings: Settings, group: WorkerGroup) -> None:
    """A worker process: configure logging (a spawned process starts blank), serve."""
    from pricehub.server.logs import configure_logging
    from pricehub.server.runner import serve

    configure_logging(log_format=settings.log_format, level=settings.log_level)
    sys.exit(serve(settings, reuse_port=True, group=group))


class _Supervisor:
    def __init__(self, settings: Settings) -> None:
        # Unchanged, workers included: a worker serves (``serve``, never ``run_workers``),
        # and its storage must know it has peers (``StorageConfig.assume_peers``).
        self._settings = settings
        self._count = settings.workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._stopping = False
        self._failed = False
        self._socket_dir = ""  # made by run: mkdtemp gives it mode 0700

    def run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        self._socket_dir = tempfile.mkdtemp(
            prefix=f"pricehub-{os.getpid()}-{self._settings.port}-"
        )
        try:
            for index in range(self._count):
                self._start(index)
            log.info("workers_started", workers=self._count, port=self._settings.port)
            while not self._stopping:
                self._reap()
            return self._shutdown()
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=_serve_worker,
            args=(self._settings, WorkerGroup(index, self._count, self._socket_dir)),
            name=f"pricehub-worker-{index}",
        )
        process.start()
        self._workers[index] = process
        self._started[index] = time.monotonic()

    def _reap(self) -> None:
        """Wait a little for worker exits; restart crashed workers."""
        by_sentinel = {process.sentinel: index for index, process in self._workers.items()}
        for sentinel in multiprocessing.connection.wait(list(by_sentinel), timeout=0.5):
            index = by_sentinel[sentinel]  # type: ignore[index]
            process = self._workers[index]
            process.join()
            if self._stopping:
                continue
            if process.exitcode == 0:
                # A clean exit only follows a signal (e.g. Ctrl-C reaching the whole
                # process group first): the operator is stopping everything.
                self._stopping = True
                continue
            log.warning("worker_exited", worker=index, pid=process.pid, code=process.exitcode)
            if time.monotonic() - self._started[index] < CRASH_LOOP_SECONDS:
                log.error("worker_crash_loop", worker=index, code=process.exitcode)
                self._stopping = self._failed = True
            else:
                self._start(index)

    def _shutdown(self) -> int:
        for process in self._workers.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: graceful, sockets closed with 1001
        deadline = time.monotonic() + self._settings.shutdown_grace + STOP_MARGIN
        for index, process in self._workers.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker_killed", worker=index, pid=process.pid)
                process.kill()
                process.join()
                self._failed = True
            elif process.exitcode != 0:
                self._failed = True
        log.info("workers_stopped", workers=self._count, failed=self._failed)
        return 1 if self._failed else 0
