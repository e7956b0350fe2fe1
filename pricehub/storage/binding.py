"""Which Redis feed a failover journal mirrors (issue 22): a journal never seeds a Redis
it did not mirror.

``FailoverStorage`` journals its memory mirror in the data dir, and on a reconcile it
writes back to Redis what Redis lacks. Pointed at another Redis, that would copy one
feed into another. So the data dir records what its journal mirrors (the journal's
meta file, ``Binding``):

* the Redis *address* (``RedisAddress``): host and port (or socket path, sentinel
  service, cluster seeds), database and key prefix, normalised and without credentials;
* the *feed id*: a random id kept in Redis under the prefix (``<prefix>feed``), next to
  the epoch, created with the feed (or stamped on the first connect to a feed an older
  pricehub created). Epochs change within one feed (a declared divergence); the feed id
  does not, so it tells "this Redis lost its data" from "this is another feed".

``mirrors`` decides, once the address matched, whether the Redis found holds the
journal's feed (or nothing, having lost its data).

The meta file also keeps the instance's *peer knowledge* (issue 23, ``PEERS_KEY``): whether
it had peers the last time it could see the instance registry. The registry lives in
Redis, so an instance restarted while Redis is away has nothing else to go by, and one
that had peers must hold its appends rather than number alone (``meta_json``,
``had_peers``). With it, who they were: the *mirror ids* of the peers' copies
(``PEER_MIRRORS_KEY``, ``peer_mirrors``), and this data dir's own (``MIRROR_KEY``,
``mirror_id``), created once and kept across restarts, unlike an instance id. A Redis
that lost its data is numbered in only once every peer known has written its copy back
(``FailoverStorage._await_peers``); after a restart only these ids can name them.
Nothing here touches Redis or disk.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pricehub.storage.errors import ConfigError

__all__ = [
    "FEED_KEY", "MIRROR_KEY", "PEERS_KEY", "PEER_MIRRORS_KEY", "Binding", "RedisAddress",
    "had_peers", "meta_json", "mirror_id", "mirrors", "peer_mirrors",
]

FEED_KEY = "feed"  # <prefix>feed: the feed id, next to <prefix>epoch
PEERS_KEY = "peers"  # the owner meta: whether the registry last showed this instance peers
PEER_MIRRORS_KEY = "peer_mirrors"  # the owner meta: the mirror ids of those peers
MIRROR_KEY = "mirror_id"  # the owner meta: this data dir's own mirror id

TCP, UNIX, SENTINEL, CLUSTER = "redis", "unix", "sentinel", "cluster"
_KINDS = (TCP, UNIX, SENTINEL, CLUSTER)
_SCHEMES = {
    "redis": TCP, "rediss": TCP, "unix": UNIX, "redis+sentinel": SENTINEL,
    "redis+cluster": CLUSTER,
}  # fmt: skip
_DEFAULT_PORT = {TCP: 6379, SENTINEL: 26379, CLUSTER: 6379}


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a feed lives, as comparable data: never a password or user name.

    ``hosts`` is sorted ``host:port`` (lower case, IPv6 in brackets), or the socket
    path; for a sentinel URL the sentinels (discovery only: the master is named by
    ``service``) and for a cluster URL the seed nodes. ``redis`` and ``rediss`` are one
    kind: TLS or not, it is the same server.
    """

    kind: str
    hosts: tuple[str, ...]
    db: int = 0
    service: str = ""
    prefix: str = "pricehub:"

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str) -> RedisAddress:
        """Parse ``url`` as the clients do (``connect_client``, ``connect_cluster``)."""
        parts = urlsplit(url)
        kind = _SCHEMES.get(parts.scheme.lower())
        try:
            if kind is None:
                raise ValueError(f"unknown scheme {parts.scheme!r}")
            db = _query_db(parts.query)
            if kind == UNIX:
                path = os.path.normpath(unquote(parts.path))
                return cls(kind, (path,), db if db is not None else 0, prefix=key_prefix)
            if kind == TCP:
                host = _host(parts.hostname or "localhost", parts.port or _DEFAULT_PORT[TCP])
                path_db = parts.path.strip("/")
                db = db if db is not None else int(path_db or 0)
                return cls(kind, (host,), db, prefix=key_prefix)
            hosts = _host_list(parts.netloc.rpartition("@")[2], _DEFAULT_PORT[kind])
            if kind == CLUSTER:
                return cls(kind, hosts, 0, prefix=key_prefix)
            segments = [segment for segment in parts.path.split("/") if segment]
            service = segments[0] if segments else "mymaster"
            db = int(segments[1]) if len(segments) > 1 else 0
            return cls(kind, hosts, db, service, key_prefix)
        except ValueError as exc:
            # The URL as given is not repeated: it may carry a password.
            raise ConfigError(f"redis_url cannot be parsed: {exc}") from None

    def same_as(self, other: RedisAddress) -> bool:
        """The same server, database and prefix. Sentinel and cluster seed lists are the
        same deployment when they share one node: seeds are added and retired over time."""
        return (
            (self.kind, self.db, self.service, self.prefix)
            == (other.kind, other.db, other.service, other.prefix)
            and bool(set(self.hosts) & set(other.hosts))
        )

    def __str__(self) -> str:
        """For logs and health: a URL without credentials, and the key prefix."""
        hosts = ",".join(self.hosts)
        where = {
            TCP: f"redis://{hosts}/{self.db}",
            UNIX: f"unix://{hosts}?db={self.db}",
            SENTINEL: f"redis+sentinel://{hosts}/{self.service}/{self.db}",
            CLUSTER: f"redis+cluster://{hosts}/",
        }[self.kind]
        return f"{where} (key prefix {self.prefix!r})"

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "hosts": list(self.hosts), "db": self.db,
            "service": self.service, "prefix": self.prefix,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RedisAddress:
        """The inverse of ``as_json``; ``ValueError`` for anything else."""
        kind, hosts, db = data.get("kind"), data.get("hosts"), data.get("db")
        service, prefix = data.get("service", ""), data.get("prefix")
        if (
            kind not in _KINDS or not isinstance(hosts, list) or not hosts
            or not all(isinstance(host, str) for host in hosts)
            or not isinstance(db, int) or not isinstance(service, str)
            or not isinstance(prefix, str)
        ):  # fmt: skip
            raise ValueError(f"not a redis address: {data!r}")
        return cls(str(kind), tuple(hosts), db, service, prefix)


def _query_db(query: str) -> int | None:
    values = parse_qs(query).get("db")
    return int(values[0]) if values else None


def _host(host: str, port: int) -> str:
    host = host.strip("[]").lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host_list(netloc: str, default_port: int) -> tuple[str, ...]:
    """``h1[:p1],h2[:p2],...`` (IPv6 as ``[::1]:p``), sorted and normalised."""
    hosts = set()
    for item in netloc.split(","):
        item = item.strip()
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = item.partition(":")
        hosts.add(_host(host or "127.0.0.1", int(port or default_port)))
    return tuple(sorted(hosts))


@dataclass(frozen=True, slots=True)
class Binding:
    """What a journal mirrors: a Redis address and the feed id found there (None until
    the journal's first reconcile with that Redis, e.g. Redis unreachable at start)."""

    address: RedisAddress
    feed_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"redis": self.address.as_json(), "feed_id": self.feed_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Binding | None:
        """A binding read from the journal's meta; None when there is none (a data dir
        written before bindings existed, or by ``--redis-url none``) or it is unreadable."""
        if data is None:
            return None
        feed_id, redis = data.get("feed_id"), data.get("redis")
        if not isinstance(redis, Mapping) or not isinstance(feed_id, str | None):
            return None
        try:
            return cls(RedisAddress.from_json(redis), feed_id)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.address}, feed {self.feed_id or 'not seen yet'}"


def mirrors(
    binding: Binding | None, *, journal_epoch: str, redis_epoch: str | None,
    redis_feed: str | None,
) -> bool:  # fmt: skip
    """Whether a Redis holding ``redis_epoch`` / ``redis_feed`` (None: missing) at the
    journal's own address holds the journal's feed (or nothing: it lost its data and
    is restored from the journal, as before bindings existed).

    A journal with no binding (written by an older pricehub, or by ``--redis-url none``)
    proves nothing by its address: only a Redis holding its epoch is the one it mirrored.
    """
    if binding is None:
        return redis_epoch == journal_epoch
    if redis_feed is not None:
        # A binding without a feed id was made while that Redis was unreachable: whatever
        # feed lives at its address is the one the instance was configured for.
        return binding.feed_id in (None, redis_feed)
    # No feed id there: empty (lost its data), or a feed of an older pricehub.
    return True


def meta_json(
    binding: Binding | None, *, peers: bool, mirror: str, peer_ids: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The meta file's object: the binding (none for a data dir of an older pricehub
    that has not met its Redis yet), this data dir's mirror id and the peer knowledge."""
    meta = {} if binding is None else binding.as_json()
    meta[PEERS_KEY] = peers
    meta[PEER_MIRRORS_KEY] = sorted(peer_ids) if peers else []
    meta[MIRROR_KEY] = mirror
    return meta


def mirror_id(meta: Mapping[str, Any] | None) -> str | None:
    """The data dir's mirror id (None: an older pricehub's or a new data dir)."""
    found = None if meta is None else meta.get(MIRROR_KEY)
    return found if isinstance(found, str) and found else None


def peer_mirrors(meta: Mapping[str, Any] | None) -> frozenset[str]:
    """The mirror ids of the peers ``had_peers`` speaks of (empty: not recorded)."""
    found = None if meta is None else meta.get(PEER_MIRRORS_KEY)
    if not isinstance(found, list):
        return frozenset()
    return frozenset(item for item in found if isinstance(item, str) and item)


def had_peers(meta: Mapping[str, Any] | None) -> bool:
    """Whether the instance that wrote ``meta`` had peers when it last saw the registry.
    A data dir without the key (an older pricehub, or a new one) says no, as before."""
    return meta is not None and meta.get(PEERS_KEY) is True
