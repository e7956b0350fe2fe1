"""Redis URLs: one parser for every scheme pricehub accepts, and the clients made from it.

* ``redis://[[user]:password@]host[:port][/db][?options]``, ``rediss://`` (TLS) and
  ``unix://[[user]:password@]/path/to/socket[?db=N]``: the client is redis-py's
  ``from_url`` of the URL as given (it reads the TLS and pool options); the parse checks
  what it would get wrong silently (a database path that is no number) or fail on late;
* ``redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]
  [?sentinel_password=...]`` (sentinels default to port 26379, the service to
  ``mymaster``);
* ``redis+cluster://[[user]:password@]host:port[,host:port...]/[?wait_replicas=N]``
  (startup nodes; an empty host is 127.0.0.1, port 6379 by default).

Hosts may be IPv6 in brackets (``[::1]:6379``). ``BadRedisUrl`` (a ``ValueError``) says
what is wrong and never repeats the URL, which may carry a password.

Clients get short socket timeouts and no driver retries: a failing Redis must surface at
once so the instance fails over to memory within a second, instead of the driver
silently retrying (and reconnecting a subscriber that missed messages, or running a
script whose reply was lost a second time).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

__all__ = [
    "CLUSTER_SCHEME",
    "BadRedisUrl",
    "RedisUrl",
    "Scheme",
    "connect_any",
    "connect_client",
    "connect_cluster",
    "is_cluster_url",
    "parse_url",
    "ping_problem",
]


class Scheme(enum.StrEnum):
    REDIS = "redis"
    REDISS = "rediss"
    UNIX = "unix"
    SENTINEL = "redis+sentinel"
    CLUSTER = "redis+cluster"


CLUSTER_SCHEME = f"{Scheme.CLUSTER}://"
_DEFAULT_PORT = {Scheme.REDIS: 6379, Scheme.REDISS: 6379, Scheme.SENTINEL: 26379,
                 Scheme.CLUSTER: 6379}  # fmt: skip


class BadRedisUrl(ValueError):
    """A Redis URL that cannot be used (the message names the part, not the URL)."""


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A parsed Redis URL.

    ``hosts``: the server (``redis``/``rediss``), the sentinels, or the cluster's startup
    nodes; empty for ``unix``, whose socket is ``socket``. ``service``: the sentinel
    master's name. ``wait_replicas``: a cluster's ``?wait_replicas=N``.
    """

    scheme: Scheme
    url: str = field(repr=False)  # as given: from_url reads the direct schemes' options
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    socket: str = ""
    service: str = ""
    sentinel_password: str | None = field(default=None, repr=False)
    wait_replicas: int = 0


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def parse_url(url: str) -> RedisUrl:
    """``url`` as typed parts; ``BadRedisUrl`` for anything a client could not use."""
    name, separator, _ = url.partition("://")
    try:
        scheme = Scheme(name if separator else "")
    except ValueError:
        schemes = ", ".join(f"{scheme}://" for scheme in Scheme)
        raise BadRedisUrl(f"redis URL must start with one of {schemes}") from None
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError as exc:
        raise BadRedisUrl(f"{scheme} URL: {exc}") from None
    if scheme is Scheme.UNIX:
        return _unix(url, parts.path, query, parts.username, parts.password)
    if scheme is Scheme.SENTINEL:
        return _sentinel(url, parts.netloc, parts.path, query, parts.password)
    credentials, _, netloc = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    if scheme is Scheme.CLUSTER:
        return RedisUrl(
            scheme, url, _hosts(scheme, netloc, default_host="127.0.0.1"),
            unquote(username) or None, unquote(password) if password else None,
            wait_replicas=_count(scheme, "wait_replicas", _first(query, "wait_replicas", "0")),
        )  # fmt: skip
    host = _hosts(scheme, netloc or "localhost", default_host="localhost")
    if len(host) != 1:
        raise BadRedisUrl(f"{scheme} URL: one host only (a list is for sentinels or a cluster)")
    db = _first(query, "db", None)
    if db is None:
        db = parts.path.strip("/") or "0"
    return RedisUrl(
        scheme, url, host, unquote(username) or None, unquote(password) if password else None,
        _count(scheme, "database", db),
    )  # fmt: skip


def _unix(
    url: str, path: str, query: dict[str, list[str]], user: str | None, password: str | None
) -> RedisUrl:
    socket = unquote(path)
    if not socket:
        raise BadRedisUrl("unix URL: no socket path (unix:///path/to/redis.sock)")
    db = _count(Scheme.UNIX, "database", _first(query, "db", "0"))
    return RedisUrl(
        Scheme.UNIX, url, (), unquote(user) if user else None,
        unquote(password) if password else None, db, socket=socket,
    )  # fmt: skip


def _sentinel(
    url: str, netloc: str, path: str, query: dict[str, list[str]], password: str | None
) -> RedisUrl:
    scheme = Scheme.SENTINEL
    segments = [segment for segment in path.split("/") if segment]
    if len(segments) > 2:
        raise BadRedisUrl(f"{scheme} URL: path must be /service[/db]")
    return RedisUrl(
        scheme, url, _hosts(scheme, netloc.rpartition("@")[2], default_host=None),
        password=unquote(password) if password else None,
        db=_count(scheme, "database", segments[1]) if len(segments) > 1 else 0,
        service=segments[0] if segments else "mymaster",
        sentinel_password=_first(query, "sentinel_password", None),
    )  # fmt: skip


def _first(query: dict[str, list[str]], name: str, default: str | None) -> str | None:
    values = query.get(name)
    return values[0] if values else default


def _count(scheme: Scheme, what: str, text: str | None) -> int:
    """A number >= 0 of the URL (a database, ``wait_replicas``)."""
    if text is None or not text.isdigit():
        raise BadRedisUrl(f"{scheme} URL: {what} must be a number >= 0, not {text!r}")
    return int(text)


def _hosts(scheme: Scheme, text: str, *, default_host: str | None) -> tuple[tuple[str, int], ...]:
    """``host[:port][,host[:port]...]``; ``default_host`` None: a host is required."""
    hosts: list[tuple[str, int]] = []
    for item in text.split(","):
        host, port = _host_port(scheme, item)
        if not host and default_host is None:
            raise BadRedisUrl(f"{scheme} URL: an empty host in {text!r}")
        hosts.append((host or cast(str, default_host), port or _DEFAULT_PORT[scheme]))
    return tuple(hosts)


def _host_port(scheme: Scheme, item: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; port 0 when not given."""
    if item.startswith("["):
        host, closed, rest = item[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise BadRedisUrl(f"{scheme} URL: bad IPv6 host {item!r}")
        port = rest[1:]
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not port:
        return host, 0
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRedisUrl(f"{scheme} URL: bad port {port!r} of host {host!r}")
    return host, int(port)


def _options(timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def connect_client(url: str, *, timeout: float) -> aioredis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``
    (``redis+cluster://``: ``connect_cluster``, or ``connect_any`` for every scheme)."""
    parsed = parse_url(url)
    options = _options(timeout)
    if parsed.scheme is Scheme.CLUSTER:
        raise BadRedisUrl("redis+cluster URL: a cluster client is connect_cluster's")
    if parsed.scheme is Scheme.SENTINEL:
        return _sentinel_client(parsed, options)
    return aioredis.Redis.from_url(url, **options)


def _sentinel_client(parsed: RedisUrl, options: dict[str, Any]) -> aioredis.Redis:
    sentinel = Sentinel(
        list(parsed.hosts),
        sentinel_kwargs={
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
            "password": parsed.sentinel_password,
        },
        **options,
    )
    client: aioredis.Redis = sentinel.master_for(
        parsed.service, db=parsed.db, password=parsed.password
    )
    return client


def connect_cluster(url: str, *, timeout: float) -> AsyncRedisCluster:
    """A cluster client on the startup nodes of ``url``, with short timeouts and no
    driver retries: MOVED/ASK are still followed (the command did not run), but a
    connection error is never resent (the script may have run)."""
    parsed = parse_url(url)
    if parsed.scheme is not Scheme.CLUSTER:
        raise BadRedisUrl(f"{parsed.scheme} URL: not a cluster ({CLUSTER_SCHEME})")
    return AsyncRedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        username=parsed.username,
        password=parsed.password,
        require_full_coverage=True,
        **_options(timeout),
    )


def connect_any(url: str, *, timeout: float) -> aioredis.Redis:
    """``connect_client`` for every scheme pricehub accepts, ``redis+cluster://``
    included."""
    if is_cluster_url(url):
        # Same command API; typed as the single-node client for the shared code paths.
        return cast(aioredis.Redis, connect_cluster(url, timeout=timeout))
    return connect_client(url, timeout=timeout)


async def ping_problem(url: str, *, timeout: float) -> str | None:
    """Why the Redis at ``url`` cannot be used right now (the driver's error), or None
    when it answers PING. One fresh connection, closed before returning."""
    try:
        client = connect_any(url, timeout=timeout)
        try:
            await client.ping()
        finally:
            await client.aclose()
    except (RedisError, RedisClusterException, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None
