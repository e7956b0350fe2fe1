"""The one Redis URL parser (``pricehub.storage.redis.urls``), without sockets: every
scheme, its defaults, and bad URLs refused with an error that names the part at fault
and never repeats a password."""

from __future__ import annotations

import pytest

from pricehub.storage.redis.urls import (
    BadRedisUrl,
    RedisUrl,
    Scheme,
    connect_client,
    connect_cluster,
    is_cluster_url,
    parse_url,
)


def test_redis_and_rediss() -> None:
    parsed = parse_url("redis://user:p%40ss@cache.local:6380/3")
    assert parsed == RedisUrl(
        Scheme.REDIS, "redis://user:p%40ss@cache.local:6380/3", (("cache.local", 6380),),
        "user", "p@ss", 3,
    )  # fmt: skip
    assert parse_url("redis://:secret@h/0").password == "secret"
    assert parse_url("redis://h/0").username is None
    tls = parse_url("rediss://127.0.0.1:6379/0?ssl_ca_certs=/x.pem")
    assert (tls.scheme, tls.hosts, tls.db) == (Scheme.REDISS, (("127.0.0.1", 6379),), 0)


def test_redis_defaults_and_db_forms() -> None:
    assert parse_url("redis://").hosts == (("localhost", 6379),)
    assert parse_url("redis://h").db == 0
    assert parse_url("redis://h/").db == 0
    assert parse_url("redis://h/5?db=7").db == 7  # the query wins, as in redis-py
    assert parse_url("redis://[::1]:7000/1").hosts == (("::1", 7000),)


def test_unix() -> None:
    parsed = parse_url("unix:///run/redis/redis.sock?db=2")
    assert (parsed.scheme, parsed.socket, parsed.db, parsed.hosts) == (
        Scheme.UNIX, "/run/redis/redis.sock", 2, (),
    )  # fmt: skip
    assert parse_url("unix:///tmp/r.sock").db == 0


def test_sentinel() -> None:
    parsed = parse_url("redis+sentinel://:pw@s1:26380,s2,[::1]:26381/feed/4?sentinel_password=sp")
    assert parsed.scheme is Scheme.SENTINEL
    assert parsed.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (parsed.service, parsed.db) == ("feed", 4)
    assert (parsed.password, parsed.sentinel_password) == ("pw", "sp")
    defaults = parse_url("redis+sentinel://s1")
    assert (defaults.service, defaults.db, defaults.password) == ("mymaster", 0, None)


def test_cluster() -> None:
    url = "redis+cluster://u:p%3A1@n1:7000,:7001,n3/?wait_replicas=1"
    parsed = parse_url(url)
    assert is_cluster_url(url) and not is_cluster_url("redis://h/0")
    assert parsed.scheme is Scheme.CLUSTER
    assert parsed.hosts == (("n1", 7000), ("127.0.0.1", 7001), ("n3", 6379))
    assert (parsed.username, parsed.password, parsed.wait_replicas) == ("u", "p:1", 1)
    assert parse_url("redis+cluster://n1:7000/").wait_replicas == 0


def test_the_password_never_shows() -> None:
    parsed = parse_url("redis+sentinel://:hunter2@s1/feed/0?sentinel_password=hunter3")
    assert "hunter" not in repr(parsed)
    with pytest.raises(BadRedisUrl) as caught:
        parse_url("redis+cluster://u:hunter2@n1:notaport/")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:6379/0", "must start with one of redis://"),
        ("h:6379", "must start with one of"),
        ("REDIS://h/0", "must start with one of"),
        ("redis://h:port/0", "bad port 'port'"),
        ("redis://h:70000/0", "bad port '70000'"),
        ("redis://h/abc", "database must be a number"),
        ("redis://h/0?db=x", "database must be a number"),
        ("redis://a:1,b:2/0", "one host only"),
        ("redis://[::1/0", "IPv6"),
        ("redis+cluster://[::1:7000/", "IPv6"),
        ("unix://", "no socket path"),
        ("unix:///tmp/r.sock?db=-1", "database must be a number"),
        ("redis+sentinel:///mymaster/0", "an empty host"),
        ("redis+sentinel://s1,,s2/mymaster/0", "an empty host"),
        ("redis+sentinel://s1:x/mymaster/0", "bad port 'x'"),
        ("redis+sentinel://s1/mymaster/zero", "database must be a number"),
        ("redis+sentinel://s1/mymaster/0/extra", "path must be /service[/db]"),
        ("redis+cluster://n1:7000/?wait_replicas=two", "wait_replicas must be a number"),
        ("redis+cluster://n1:0/", "bad port '0'"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(BadRedisUrl) as caught:
        parse_url(url)
    assert says in str(caught.value)
    assert isinstance(caught.value, ValueError)  # what callers caught before


def test_each_connect_takes_its_own_schemes() -> None:
    """No socket is opened: redis-py clients connect lazily."""
    with pytest.raises(BadRedisUrl, match="connect_cluster"):
        connect_client("redis+cluster://n1:7000/", timeout=0.5)
    with pytest.raises(BadRedisUrl, match="not a cluster"):
        connect_cluster("redis://h/0", timeout=0.5)
    with pytest.raises(BadRedisUrl, match="database"):
        connect_client("redis://h/abc", timeout=0.5)
