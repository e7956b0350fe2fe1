"""Settings: one frozen dataclass, loaded from defaults < TOML file < environment < flags.

Every option is described once, in ``OPTIONS``; the command-line parser, the
``PRICEHUB_*`` environment variables, the TOML keys and ``config/pricehub.example.toml``
all follow from that table, so they cannot drift apart. Every value, whatever its source,
goes through its option's ``Kind`` (one typed parser: ``history_size = 10.5`` or
``PRICEHUB_PORT=abc`` is an error naming the key as that source spells it); values are
then validated when the ``Settings`` object is built, with messages that name the option
and what was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from pricehub import __version__
from pricehub.server.errors import ConfigError, UsageError
from pricehub.storage.base import StorageConfig
from pricehub.wire.messages import is_valid_zone_name

__all__ = [
    "DEFAULT_ZONES",
    "MIN_SNAPSHOT_ZONES",
    "OPTIONS",
    "Option",
    "Settings",
    "build_parser",
    "example_toml",
    "load_settings",
    "read_zones_file",
]

DEFAULT_ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
# Zones one snapshot may read at least, whatever --max-zones-per-socket says: on one Redis
# node 1,000 zones are one MGET, ~4 ms (bench/snapshot_history.py).
MIN_SNAPSHOT_ZONES = 1000
ENV_PREFIX = "PRICEHUB_"
ENV_CONFIG = ENV_PREFIX + "CONFIG"
# PRICEHUB_* variables that are not settings and draw no "unknown variable" warning:
# run_server.py's re-exec marker, and those of scripts/ and of the browser test.
OTHER_ENV = frozenset(
    ENV_PREFIX + name for name in ("IN_PROJECT_VENV", "DEPS", "LOCK_TOOLS", "UPDATE_SCREENSHOT")
)


# --- value kinds: one typed parser for flags, environment and TOML alike -----------------


@dataclass(frozen=True, slots=True)
class Kind:
    """How the values of one type of option are read.

    ``from_text`` reads a flag's or an environment variable's string, ``from_toml`` a value
    as TOML typed it (or as Python code passes it); both raise ``ValueError`` for a value
    of the wrong type, which the caller reports with where the value came from and
    ``expected``. Both accept what they return, so a parsed value can be checked again.
    """

    expected: str
    from_text: Callable[[str], Any]
    from_toml: Callable[[object], Any]


def _text_int(text: str) -> int:
    return int(text)  # "10.5", "true", "" raise ValueError


def _toml_int(value: object) -> int:
    # bool is an int subclass: ``history_size = true`` must not be 1.
    if type(value) is not int:
        raise ValueError
    return value


def _finite(number: float) -> float:
    if not math.isfinite(number):  # nan passes every "> 0" check
        raise ValueError
    return number


def _toml_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError  # an integer is a number too; a bool is not
    return _finite(float(value))


def _text_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError


def _toml_bool(value: object) -> bool:
    if type(value) is not bool:  # ``simulate = 0`` or "false": not a TOML bool
        raise ValueError
    return value


def _toml_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _text_optional(text: str) -> str | None:
    return None if text.strip().lower() in {"", "none", "null"} else text.strip()


def _toml_optional(value: object) -> str | None:
    # TOML has no null: the string 'none' unsets, as on the command line.
    return None if value is None else _text_optional(_toml_str(value))


def _text_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _toml_list(value: object) -> tuple[str, ...]:
    """An array of strings, or one comma-separated string as the flag takes."""
    if isinstance(value, str):
        return _text_list(value)
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError
    return tuple(value)


STR = Kind("a string", str, _toml_str)
OPTIONAL_STR = Kind("a string ('none': unset)", _text_optional, _toml_optional)
INT = Kind("an integer", _text_int, _toml_int)
FLOAT = Kind("a number", lambda text: _finite(float(text)), _toml_float)
BOOL = Kind("true or false", _text_bool, _toml_bool)
STR_LIST = Kind("an array of strings or a comma-separated string", _text_list, _toml_list)


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the command line, environment and TOML file see it."""

    name: str
    kind: Kind
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def boolean_flag(self) -> bool:
        """``--simulate`` / ``--no-simulate`` rather than ``--simulate VALUE``."""
        return self.kind is BOOL

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, "--no-" + self.flag[2:]) if self.boolean_flag else (self.flag,)

    def parse(self, value: object, where: str, *, text: bool) -> Any:
        """``value`` typed, or a ``ConfigError`` naming ``where`` (``--port``,
        ``PRICEHUB_PORT``, ``port in p.toml``) and the type expected. ``text``: a
        string from a flag or the environment, else a value as TOML typed it."""
        try:
            if text:
                return self.kind.from_text(str(value))
            return self.kind.from_toml(value)
        except ValueError:
            got = repr(value) if text else _toml_shown(value)
            raise ConfigError(f"{where}: expected {self.kind.expected}, got {got}") from None


def _option(default: Any, help_text: str, kind: Kind) -> Any:
    """A ``Settings`` field that also describes its option, so the flag, its help, the
    environment variable and the TOML key are all derived from the one declaration."""
    return field(default=default, metadata={"help": help_text, "kind": kind})


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """All of pricehub's settings. Build with ``Settings(...)`` or ``load_settings``.

    Defaults are those of ``PROTOCOL.md``'s operator contract.
    """

    host: str = _option("127.0.0.1", "address to listen on", STR)
    port: int = _option(8080, "TCP port to listen on", INT)
    redis_url: str | None = _option(
        "redis://127.0.0.1:6379/0",
        "Redis URL used when reachable; 'none' = in-memory only",
        OPTIONAL_STR,
    )
    zones: tuple[str, ...] = _option(DEFAULT_ZONES, "comma list of market zones served", STR_LIST)
    publish_key: tuple[str, ...] = _option(
        (), "bearer key(s), comma list; none disables HTTP publishing", STR_LIST
    )
    # None means "on when no publish key is given" (resolved by ``simulator_enabled``).
    simulate: bool | None = _option(
        None,
        "built-in price simulator (default: on without publish keys)",
        BOOL,
    )
    simulate_interval: float = _option(1.0, "seconds between simulated ticks per zone", FLOAT)
    heartbeat_interval: float = _option(30.0, "seconds between server pings", FLOAT)
    heartbeat_timeout: float = _option(
        60.0, "silence (seconds) after which a client is closed (4000)", FLOAT
    )
    history_size: int = _option(1000, "price objects retained per zone", INT)
    allowed_origins: tuple[str, ...] = _option(
        (),
        "browser Origins allowed to open sockets; '*' = any (default: same origin only)",
        STR_LIST,
    )
    workers: int = _option(1, "worker processes sharing the port (needs Redis when > 1)", INT)
    tls_cert: str | None = _option(None, "PEM certificate: serve https/wss directly", OPTIONAL_STR)
    tls_key: str | None = _option(None, "PEM private key for --tls-cert", OPTIONAL_STR)
    log_format: str | None = _option(
        None, "'console' or 'json' (default: console on a TTY)", OPTIONAL_STR
    )
    log_level: str = _option("info", "minimum log level (debug, info, warning, error)", STR)
    jwt_secret: str | None = _option(None, "HS256 secret: subscriber tokens required", OPTIONAL_STR)
    jwt_public_key: str | None = _option(
        None, "PEM file (RS256/ES256): subscriber tokens required", OPTIONAL_STR
    )
    max_frame_size: int = _option(65536, "largest client frame in bytes (bigger: close 1009)", INT)
    max_connections: int = _option(50000, "open sockets in total (over: close 1013)", INT)
    max_connections_per_ip: int = _option(1000, "open sockets per remote address", INT)
    client_rate_limit: float = _option(
        20.0, "client messages per second per connection (burst 2x)", FLOAT
    )
    max_zones_per_socket: int = _option(64, "zones one multi-zone socket may subscribe to", INT)
    stale_after: float = _option(
        0.0, "seconds without an accepted price after which a zone is announced stale (0: off)",
        FLOAT,
    )
    max_body_size: int = _option(
        1024 * 1024, "largest publish request body in bytes (over: 413)", INT
    )
    max_batch_size: int = _option(1000, "price objects in one publish request", INT)
    publish_rate_limit: float = _option(
        200.0, "publish requests per second per key (over: 429)", FLOAT
    )
    send_high_water: int = _option(
        256 * 1024,
        "unsent bytes per socket (pricehub buffer + kernel send queue) above which updates "
        "are conflated",
        INT,
    )
    # 1 MiB: with conflation this buffer barely grows, and max_connections x this is
    # the worst case an operator must size memory for.
    send_hard_limit: int = _option(
        1024 * 1024, "bytes in pricehub's own buffer per socket above which it is closed (4008)",
        INT,
    )
    slow_consumer_timeout: float = _option(
        30.0, "seconds a socket may stay conflated (4008)", FLOAT
    )
    send_max_lag: float = _option(
        2.0, "seconds after which bytes a client has not received make it conflated", FLOAT
    )
    flush_delay: float = _option(
        0.0, "seconds to batch updates before writing (0: end of the event-loop tick)", FLOAT
    )
    compression: bool = _option(
        False, "permessage-deflate for clients that offer it", BOOL
    )
    handshake_timeout: float = _option(10.0, "seconds a client has to finish the upgrade", FLOAT)
    shutdown_grace: float = _option(5.0, "seconds to drain sockets on shutdown", FLOAT)
    key_prefix: str = _option("pricehub:", "prefix of every Redis key and channel", STR)
    redis_timeout: float = _option(0.5, "Redis socket timeout in seconds (failover trigger)", FLOAT)
    redis_probe_interval: float = _option(1.0, "seconds between probes of a lost Redis", FLOAT)
    loop_lag_threshold: float = _option(
        0.5, "event-loop lag (seconds) that makes health degraded", FLOAT
    )
    operator_key: tuple[str, ...] = _option(
        (), "bearer key(s), comma list, for stats, connections and /metrics (see "
        "docs/security.md; with subscriber auth on and no key they are closed)", STR_LIST
    )
    body_timeout: float = _option(
        10.0, "seconds a publisher has to send the whole request body (over: 408)", FLOAT
    )
    auth_failure_limit: int = _option(
        10, "failed publish/operator key attempts per minute per address (over: 429)", INT
    )
    redis_hold: float = _option(
        5.0,
        "seconds an instance with peers holds publishes while Redis is away, instead of "
        "numbering alone (then 503 + Retry-After); 0 = fail over to memory as a lone "
        "instance does",
        FLOAT,
    )
    zones_file: str | None = _option(
        None,
        "zones from a file, one name per line ('#' comments), for thousands of zones; "
        "replaces --zones",
        OPTIONAL_STR,
    )
    # Derived, not an option: ``zones`` as a set, for O(1) membership checks (validation,
    # admission, subscribe); ``zones`` keeps the configured order.
    zone_set: frozenset[str] = field(
        default=frozenset(), init=False, repr=False, compare=False
    )
    # Not an option either: whether ``redis_url`` was given (flag, environment or file;
    # ``from_mapping`` tells) or left at its default. Only a Redis the operator asked for
    # makes serving from memory a degradation (health, ``pricehub_redis_required``).
    # Built in code, a Settings counts its redis_url as given.
    redis_url_explicit: bool = field(default=True, compare=False)
    # Relative to the working directory, like Prometheus's --storage.tsdb.path.
    data_dir: str | None = _option(
        "data",
        "directory keeping the in-memory store durable (one SQLite database); 'none' = "
        "nothing on disk",
        OPTIONAL_STR,
    )
    adopt_journal: bool = _option(
        False,
        "take the failover journal in --data-dir as this Redis's even if it mirrored "
        "another Redis (seeds an empty one from it); for one start",
        BOOL,
    )

    def __post_init__(self) -> None:
        if self.zones_file is not None:
            object.__setattr__(self, "zones", read_zones_file(Path(self.zones_file)))
        object.__setattr__(self, "zone_set", frozenset(self.zones))
        for check in _CHECKS:
            check(self)

    @property
    def simulator_enabled(self) -> bool:
        return (not self.publish_key) if self.simulate is None else self.simulate

    @property
    def max_history_zones(self) -> int:
        """Zones one history-by-time query may cover (``--max-zones-per-socket``): on
        Redis its script holds Redis's one thread ~1 ms per zone at 1,000 retained."""
        return self.max_zones_per_socket

    @property
    def max_snapshot_zones(self) -> int:
        """Zones one snapshot may read: ``MIN_SNAPSHOT_ZONES``, or more when a socket may
        subscribe to more (its snapshot is of its zones)."""
        return max(MIN_SNAPSHOT_ZONES, self.max_zones_per_socket)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def storage_config(self) -> StorageConfig:
        """What ``pricehub.storage.create_storage`` builds the storage from."""
        return StorageConfig(
            redis_url=self.redis_url,
            zones=self.zones,
            key_prefix=self.key_prefix,
            history_size=self.history_size,
            data_dir=self.data_dir,
            redis_timeout=self.redis_timeout,
            redis_probe_interval=self.redis_probe_interval,
            redis_hold=self.redis_hold,
            # Workers share the port and one Redis: each has peers from its first price.
            assume_peers=self.workers > 1,
            adopt_journal=self.adopt_journal,
        )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "settings") -> Settings:
        """Build from already-typed or string values (strings read as a flag's); unknown
        keys and values of the wrong type are an error naming ``source`` and the key."""
        unknown = sorted(set(values) - _OPTIONS_BY_NAME.keys())
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        typed = {
            name: _OPTIONS_BY_NAME[name].parse(
                value, f"{source}: {name}", text=isinstance(value, str)
            )
            for name, value in values.items()
        }
        return cls(**typed, redis_url_explicit="redis_url" in values)


OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.metadata["kind"], f.metadata["help"])
    for f in fields(Settings)
    if "kind" in f.metadata  # derived fields (zone_set) are no option
)
_OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

# How TOML calls the types of its values, for "expected an integer, got 10.5 (a float)".
_TOML_TYPES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
               list: "an array", dict: "a table"}  # fmt: skip


def _toml_shown(value: object) -> str:
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    shown = repr(value) if isinstance(value, str) else str(value)  # a date as 2024-01-01
    return f"{shown} ({_TOML_TYPES.get(type(value), 'a ' + type(value).__name__)})"


def _positive(*names: str) -> Callable[[Settings], None]:
    def check(settings: Settings) -> None:
        for name in names:
            if getattr(settings, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(settings, name)!r}")

    return check


def read_zones_file(path: Path) -> tuple[str, ...]:
    """``--zones-file``: one zone per line (``\n`` or ``\r\n``; a UTF-8 BOM is
    skipped); ``#`` starts a comment, blank lines are ignored. A bad or repeated name is
    an error naming its line (one pass, O(n))."""
    seen: dict[str, int] = {}
    # Lines end at "\n" only: str.splitlines() also splits at U+2028, VT, FF and more,
    # which would turn one odd line into several zones.
    for number, line in enumerate(_read_regular_file(path).split("\n"), start=1):
        zone = line.partition("#")[0].strip(" \t\r")
        if not zone:
            continue
        if not is_valid_zone_name(zone):
            raise ConfigError(
                f"zones_file {path}:{number}: {zone[:40]!r} is not a valid zone name "
                "([a-z0-9_]{1,32})"
            )
        if zone in seen:
            raise ConfigError(
                f"zones_file {path}:{number}: duplicate zone {zone!r} (first on line "
                f"{seen[zone]})"
            )
        seen[zone] = number
    if not seen:
        raise ConfigError(f"zones_file {path}: no zones in the file")
    return tuple(seen)


def _read_regular_file(path: Path) -> str:
    """A regular file's UTF-8 text. Anything else is refused at once: opening a FIFO
    for reading would block start-up until some writer appears, and a device such as
    /dev/zero never ends (O_NONBLOCK makes the open itself return; fstat then decides)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"zones_file {path}: not a regular file")
            with open(fd, "rb", closefd=False) as file:
                return file.read().decode("utf-8-sig")
        finally:
            os.close(fd)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"zones_file {path}: {exc}") from None


def _check_zones(settings: Settings) -> None:
    if not settings.zones:
        raise ConfigError("zones: at least one zone is required")
    if settings.zones_file is not None:
        return  # read_zones_file validated every line already
    for zone in settings.zones:
        if not is_valid_zone_name(zone):
            raise ConfigError(f"zones: {zone!r} is not a valid zone name ([a-z0-9_]{{1,32}})")
    if len(settings.zone_set) != len(settings.zones):
        raise ConfigError("zones: duplicate zone names")


def _check_ranges(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {settings.port}")
    if settings.heartbeat_timeout <= settings.heartbeat_interval:
        raise ConfigError("heartbeat_timeout must be greater than heartbeat_interval")
    if not 0 <= settings.stale_after < math.inf:  # (also refuses NaN)
        raise ConfigError(f"stale_after must be >= 0 and finite, got {settings.stale_after!r}")
    if settings.flush_delay < 0:
        raise ConfigError(f"flush_delay must be >= 0, got {settings.flush_delay!r}")
    if settings.send_hard_limit <= settings.send_high_water:
        raise ConfigError("send_hard_limit must be greater than send_high_water")
    if settings.log_format not in (None, "console", "json"):
        raise ConfigError(f"log_format must be 'console' or 'json', got {settings.log_format!r}")
    if settings.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"log_level must be debug/info/warning/error, got {settings.log_level!r}")


def _check_files(settings: Settings) -> None:
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key must be given together")
    if settings.jwt_secret is not None and settings.jwt_public_key is not None:
        raise ConfigError("give jwt_secret or jwt_public_key, not both")
    for name in ("tls_cert", "tls_key", "jwt_public_key"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{name}: file not found: {path}")
    # Else mkdir's "File exists" would be all the journal could say about it.
    if settings.data_dir is not None and Path(settings.data_dir).exists() and not Path(
        settings.data_dir
    ).is_dir():
        raise ConfigError(f"data_dir: {settings.data_dir} is not a directory")


def _check_redis(settings: Settings) -> None:
    url = settings.redis_url
    schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
    if url is not None and not url.startswith(schemes):
        raise ConfigError(f"redis_url must start with one of {', '.join(schemes)}, got {url!r}")
    if url is not None and url.startswith("redis+cluster://") and (
        "{" in settings.key_prefix or "}" in settings.key_prefix
    ):
        # The zone is the hash tag of every key on a cluster; braces in the prefix
        # would become the tag instead and put every zone in one slot.
        raise ConfigError("key_prefix must not contain '{' or '}' with redis+cluster://")
    if settings.workers > 1 and url is None:
        raise ConfigError("workers > 1 needs Redis: the workers form a cluster through it")
    if settings.redis_hold < 0:
        raise ConfigError(f"redis_hold must be >= 0, got {settings.redis_hold!r}")


_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _positive(
        "heartbeat_interval", "heartbeat_timeout", "history_size", "workers", "max_frame_size",
        "max_connections", "max_connections_per_ip", "client_rate_limit", "max_zones_per_socket",
        "max_body_size", "max_batch_size", "publish_rate_limit", "send_high_water",
        "send_hard_limit", "slow_consumer_timeout", "send_max_lag", "handshake_timeout",
        "simulate_interval",
        "redis_timeout", "redis_probe_interval", "loop_lag_threshold",
    ),
    _check_zones,
    _check_ranges,
    _check_files,
    _check_redis,
    _positive("body_timeout", "auth_failure_limit"),
)


SUBCOMMANDS = ("serve", "tail")
_HELP_USAGE = "%(prog)s [serve] [options]\n       %(prog)s tail ZONE [ZONE ...] [options]"
_HELP_EPILOG = f"""\
subcommands:
  pricehub [serve] [options]  run the server (these options; "serve" may be left out)
  pricehub tail ZONE ...      watch zones live from a terminal: see pricehub tail --help

environment and config file:
  Every option is also an environment variable {ENV_PREFIX}<NAME> (--history-size:
  {ENV_PREFIX}HISTORY_SIZE=500) and a key of the TOML file given by --config or
  {ENV_CONFIG} (history_size = 500; see config/pricehub.example.toml).
  Precedence: flag > environment variable > config file > default.
  On/off options take true/false in TOML, and also 1/0, yes/no, on/off in the
  environment ({ENV_PREFIX}COMPRESSION=on); 'none' unsets an option that can be unset
  (--redis-url none). A value of the wrong type is an error naming the flag, variable
  or key."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``UsageError``, exit 2): argparse's 30-line usage above
    the message buries the one thing that is wrong. ``--help`` still shows everything."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def build_parser(prog: str = "pricehub") -> argparse.ArgumentParser:
    """The server's command line; every option defaults to "not given" (precedence)."""
    parser = _Parser(
        prog=prog,
        usage=_HELP_USAGE,
        description="pricehub: real-time energy-market prices over WebSocket and SSE",
        epilog=_HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        # A prefix (--por) would be taken for the one option it starts, until an option
        # that starts the same is added; an unknown option gets a "did you mean" instead.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"pricehub {__version__}")
    parser.add_argument(
        "--config", help=f"TOML file with settings, keys named as the options ({ENV_CONFIG})"
    )
    for option in OPTIONS:
        default = _DEFAULTS[option.name]
        # Help that already explains its default ("default: ...") is not given a second one.
        help_text = option.help if "default:" in option.help else (
            f"{option.help} (default: {_show(default)})"
        )
        if option.boolean_flag:
            parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.name, type=str, help=help_text)
    return parser


# Defaults from the field declarations: no Settings() is built for --help (its checks look
# at the working directory, e.g. whether ./data is a directory).
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings) if "kind" in f.metadata}
# Every flag, for "did you mean".
_FLAGS = ("--help", "--version", "--config", *(flag for option in OPTIONS for flag in option.flags))


def _show(value: Any) -> str:
    """A default as the README's configuration table shows it: off, 30, pjm,caiso, none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "none" if value is None else str(value)


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest candidate, compared without ``prefix`` (the
    ``--`` or ``PRICEHUB_`` all share would make everything look alike), or ''."""
    stems = {candidate.removeprefix(prefix): candidate for candidate in candidates}
    matches = difflib.get_close_matches(word.removeprefix(prefix), list(stems), n=1)
    return f" (did you mean {stems[matches[0]]}?)" if matches else ""


def load_settings(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Settings:
    """Defaults < TOML file (``--config`` or ``PRICEHUB_CONFIG``) < environment < flags.

    Every value goes through its option's ``Kind``, whatever its source; a wrong one is a
    ``ConfigError`` naming it as that source spells it. ``warn`` gets one line for each
    ``PRICEHUB_*`` variable that is no setting (default: printed to stderr).
    """
    environ = os.environ if environ is None else environ
    config_path, flags = _from_flags(argv)
    config_path = config_path or environ.get(ENV_CONFIG)
    typed = _from_toml(Path(config_path)) if config_path else {}
    typed.update(_from_environment(environ, warn or _warn_on_stderr))
    typed.update(flags)
    return Settings.from_mapping(typed, source="configuration")


def _from_flags(argv: Sequence[str] | None) -> tuple[str | None, dict[str, Any]]:
    """``--config``'s value, and the other flags given, typed."""
    namespace, extras = build_parser().parse_known_args(argv)
    if extras:
        raise UsageError(_unknown_argument(extras[0]))
    given = vars(namespace)
    config_path: str | None = given.pop("config", None)
    typed = {
        # A --x/--no-x flag is already a bool; every other flag is text.
        name: _OPTIONS_BY_NAME[name].parse(
            value, _OPTIONS_BY_NAME[name].flag, text=isinstance(value, str)
        )
        for name, value in given.items()
    }
    return config_path, typed


def _unknown_argument(argument: str) -> str:
    if argument.startswith("-"):
        flag = argument.partition("=")[0]
        return f"unknown option {flag}{_did_you_mean(flag, _FLAGS, '--')}; see --help"
    return f"unexpected argument {argument!r}{_did_you_mean(argument, SUBCOMMANDS)}; see --help"


def _from_environment(environ: Mapping[str, str], warn: Callable[[str], None]) -> dict[str, Any]:
    """The ``PRICEHUB_<NAME>`` variables, typed; a warning for each unknown one (a typo
    would otherwise leave its option at the default without a word)."""
    settings_env = (ENV_CONFIG, *(option.env for option in OPTIONS))
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in settings_env and name not in OTHER_ENV:
            hint = _did_you_mean(name, settings_env, ENV_PREFIX)
            warn(f"{name} is not a pricehub setting, ignored{hint}")
    return {
        option.name: option.parse(environ[option.env], option.env, text=True)
        for option in OPTIONS
        if option.env in environ
    }


def _warn_on_stderr(line: str) -> None:
    print(f"pricehub: warning: {line}", file=sys.stderr)


def _from_toml(path: Path) -> dict[str, Any]:
    """The settings of a TOML file, typed as TOML typed them (``port = "80"`` is a string,
    not a port). Keys may be spelled with dashes, as the flags are."""
    table = _read_toml(path)
    unknown = [key for key in table if key.replace("-", "_") not in _OPTIONS_BY_NAME]
    if len(unknown) == 1:
        raise ConfigError(f"unknown setting {unknown[0]} in {path}{_key_hint(unknown[0])}")
    if unknown:
        keys = ", ".join(key + _key_hint(key) for key in unknown)
        raise ConfigError(f"unknown settings in {path}: {keys}")
    typed: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in spelled:
            raise ConfigError(f"config file {path}: {spelled[name]} and {key} are one setting")
        spelled[name] = key
        typed[name] = _OPTIONS_BY_NAME[name].parse(value, f"{key} in {path}", text=False)
    return typed


def _key_hint(key: str) -> str:
    # Suggested in the spelling used: publish-kye -> publish-key, publish_kye -> publish_key.
    names = [name.replace("_", "-") if "-" in key else name for name in _OPTIONS_BY_NAME]
    return _did_you_mean(key, names)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    table = data.get("pricehub", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [pricehub] must be a table")
    outside = sorted(set(data) - {"pricehub"}) if table is not data else []
    if outside:
        # Keys above [pricehub] would be silently ignored, like a misspelled one.
        raise ConfigError(
            f"config file {path}: {', '.join(outside)} outside the [pricehub] table "
            "(put every setting in it, or use no table)"
        )
    return table


def example_toml() -> str:
    """The documented example config (``config/pricehub.example.toml``): every key with
    its default. A test keeps the checked-in file equal to this."""
    lines = [
        "# pricehub configuration: every key with its default.",
        "# Use with `python run_server.py --config config/pricehub.example.toml`.",
        "# Precedence: command-line flag > PRICEHUB_<KEY> environment variable > this file",
        "# > default. Keys may also sit under a [pricehub] table.",
        "# Values are typed as shown: integers (not 10.5), numbers (1 or 1.5), true/false",
        '# (not 0 or "false"), strings, and lists as arrays of strings (or one comma-separated',
        '# string, as the flag takes). Leave a key out for its default; "none" unsets',
        "# redis_url, data_dir and the like. A value of the wrong type or an unknown key is an",
        "# error naming the key.",
        "",
    ]
    for option in OPTIONS:
        lines.append(f"# {option.help}")
        lines.append(_toml_line(option.name, _DEFAULTS[option.name]))
        lines.append("")
    return "\n".join(lines)


def _toml_line(name: str, value: Any) -> str:
    if value is None:
        return f"# {name} = (unset)"
    if isinstance(value, bool):
        return f"{name} = {str(value).lower()}"
    if isinstance(value, tuple):
        items = ", ".join(f'"{item}"' for item in value)
        return f"{name} = [{items}]"
    if isinstance(value, str):
        return f'{name} = "{value}"'
    return f"{name} = {value}"
