"""Settings: one frozen dataclass, loaded from defaults < TOML file < environment < flags.

Every option is described once, in ``OPTIONS``; the command-line parser, the
``PRICEHUB_*`` environment variables, the TOML keys and ``config/pricehub.example.toml``
all follow from that table, so they cannot drift apart. Values are validated when the
``Settings`` object is built, with messages that name the option and what was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pricehub.server.errors import ConfigError
from pricehub.wire.messages import is_valid_zone_name

__all__ = [
    "DEFAULT_ZONES",
    "OPTIONS",
    "Option",
    "Settings",
    "build_parser",
    "example_toml",
    "load_settings",
    "read_zones_file",
]

DEFAULT_ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
ENV_PREFIX = "PRICEHUB_"


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _optional(value: str) -> str | None:
    return None if value.strip().lower() in {"", "none", "null"} else value.strip()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {value!r}")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the command line, environment and TOML file see it."""

    name: str
    parse: Callable[[str], Any]
    help: str
    boolean_flag: bool = False


def _option(
    default: Any, help_text: str, parse: Callable[[str], Any], *, boolean_flag: bool = False
) -> Any:
    """A ``Settings`` field that also describes its option, so the flag, its help, the
    environment variable and the TOML key are all derived from the one declaration."""
    return field(
        default=default,
        metadata={"help": help_text, "parse": parse, "boolean_flag": boolean_flag},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """All of pricehub's settings. Build with ``Settings(...)`` or ``load_settings``.

    Defaults are those of ``PROTOCOL.md``'s operator contract.
    """

    host: str = _option("127.0.0.1", "address to listen on", str)
    port: int = _option(8080, "TCP port to listen on", int)
    redis_url: str | None = _option(
        "redis://127.0.0.1:6379/0",
        "Redis URL used when reachable; 'none' = in-memory only",
        _optional,
    )
    zones: tuple[str, ...] = _option(DEFAULT_ZONES, "comma list of market zones served", _split)
    publish_key: tuple[str, ...] = _option(
        (), "bearer key(s), comma list; none disables HTTP publishing", _split
    )
    # None means "on when no publish key is given" (resolved by ``simulator_enabled``).
    simulate: bool | None = _option(
        None,
        "built-in price simulator (default: on without publish keys)",
        _bool,
        boolean_flag=True,
    )
    simulate_interval: float = _option(1.0, "seconds between simulated ticks per zone", float)
    heartbeat_interval: float = _option(30.0, "seconds between server pings", float)
    heartbeat_timeout: float = _option(
        60.0, "silence (seconds) after which a client is closed (4000)", float
    )
    history_size: int = _option(1000, "price objects retained per zone", int)
    allowed_origins: tuple[str, ...] = _option(
        (), "browser Origins allowed to open sockets; '*' = any (default: same origin only)", _split
    )
    workers: int = _option(1, "worker processes sharing the port (needs Redis when > 1)", int)
    tls_cert: str | None = _option(None, "PEM certificate: serve https/wss directly", _optional)
    tls_key: str | None = _option(None, "PEM private key for --tls-cert", _optional)
    log_format: str | None = _option(
        None, "'console' or 'json' (default: console on a TTY)", _optional
    )
    log_level: str = _option("info", "minimum log level (debug, info, warning, error)", str)
    jwt_secret: str | None = _option(None, "HS256 secret: subscriber tokens required", _optional)
    jwt_public_key: str | None = _option(
        None, "PEM file (RS256/ES256): subscriber tokens required", _optional
    )
    max_frame_size: int = _option(65536, "largest client frame in bytes (bigger: close 1009)", int)
    max_connections: int = _option(50000, "open sockets in total (over: close 1013)", int)
    max_connections_per_ip: int = _option(1000, "open sockets per remote address", int)
    client_rate_limit: float = _option(
        20.0, "client messages per second per connection (burst 2x)", float
    )
    max_zones_per_socket: int = _option(64, "zones one multi-zone socket may subscribe to", int)
    max_body_size: int = _option(
        1024 * 1024, "largest publish request body in bytes (over: 413)", int
    )
    max_batch_size: int = _option(1000, "price objects in one publish request", int)
    publish_rate_limit: float = _option(
        200.0, "publish requests per second per key (over: 429)", float
    )
    send_high_water: int = _option(
        256 * 1024,
        "unsent bytes per socket (pricehub buffer + kernel send queue) above which updates "
        "are conflated",
        int,
    )
    # 1 MiB: with conflation this buffer barely grows, and max_connections x this is
    # the worst case an operator must size memory for.
    send_hard_limit: int = _option(
        1024 * 1024, "bytes in pricehub's own buffer per socket above which it is closed (4008)",
        int,
    )
    slow_consumer_timeout: float = _option(
        30.0, "seconds a socket may stay conflated (4008)", float
    )
    send_max_lag: float = _option(
        2.0, "seconds after which bytes a client has not received make it conflated", float
    )
    flush_delay: float = _option(
        0.0, "seconds to batch updates before writing (0: end of the event-loop tick)", float
    )
    compression: bool = _option(
        False, "permessage-deflate for clients that offer it", _bool, boolean_flag=True
    )
    handshake_timeout: float = _option(10.0, "seconds a client has to finish the upgrade", float)
    shutdown_grace: float = _option(5.0, "seconds to drain sockets on shutdown", float)
    key_prefix: str = _option("pricehub:", "prefix of every Redis key and channel", str)
    redis_timeout: float = _option(0.5, "Redis socket timeout in seconds (failover trigger)", float)
    redis_probe_interval: float = _option(1.0, "seconds between probes of a lost Redis", float)
    loop_lag_threshold: float = _option(
        0.5, "event-loop lag (seconds) that makes health degraded", float
    )
    operator_key: tuple[str, ...] = _option(
        (), "bearer key(s), comma list, for stats, connections and /metrics (see "
        "docs/security.md; with subscriber auth on and no key they are closed)", _split
    )
    body_timeout: float = _option(
        10.0, "seconds a publisher has to send the whole request body (over: 408)", float
    )
    auth_failure_limit: int = _option(
        10, "failed publish/operator key attempts per minute per address (over: 429)", int
    )
    redis_hold: float = _option(
        5.0,
        "seconds an instance with peers holds publishes while Redis is away, instead of "
        "numbering alone (then 503 + Retry-After); 0 = fail over to memory as a lone "
        "instance does",
        float,
    )
    zones_file: str | None = _option(
        None,
        "zones from a file, one name per line ('#' comments), for thousands of zones; "
        "replaces --zones",
        _optional,
    )
    # Derived, not an option: ``zones`` as a set, for O(1) membership checks (validation,
    # admission, subscribe); ``zones`` keeps the configured order.
    zone_set: frozenset[str] = field(
        default=frozenset(), init=False, repr=False, compare=False
    )
    # Relative to the working directory, like Prometheus's --storage.tsdb.path.
    data_dir: str | None = _option(
        "data",
        "directory keeping the in-memory store durable (journal + snapshots); 'none' = "
        "nothing on disk",
        _optional,
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

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "settings") -> Settings:
        """Build from already-typed or string values; unknown keys are an error."""
        unknown = sorted(set(values) - _OPTIONS_BY_NAME.keys())
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        return cls(**{name: _coerce(name, value, source) for name, value in values.items()})


OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.metadata["parse"], f.metadata["help"], f.metadata["boolean_flag"])
    for f in fields(Settings)
    if "parse" in f.metadata  # derived fields (zone_set) are no option
)
_OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def _coerce(name: str, value: Any, source: str) -> Any:
    option = _OPTIONS_BY_NAME[name]
    try:
        if isinstance(value, str):
            return option.parse(value)
        if isinstance(value, list):
            return tuple(str(item) for item in value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None
    return value


def _positive(*names: str) -> Callable[[Settings], None]:
    def check(settings: Settings) -> None:
        for name in names:
            if getattr(settings, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(settings, name)!r}")

    return check


def read_zones_file(path: Path) -> tuple[str, ...]:
    """``--zones-file``: one zone per line; ``#`` starts a comment, blank lines are
    ignored. A bad or repeated name is an error naming its line (one pass, O(n))."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"zones_file {path}: {exc}") from None
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        zone = line.partition("#")[0].strip()
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


def build_parser(prog: str = "pricehub") -> argparse.ArgumentParser:
    """The server's command line; every option defaults to "not given" (precedence)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="pricehub: real-time energy-market prices over WebSocket",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML file with settings (keys as in the flags)")
    defaults = Settings()
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        default = getattr(defaults, option.name)
        # Help that already explains its default ("default: ...") is not given a second one.
        help_text = option.help if "default:" in option.help else (
            f"{option.help} (default: {_show(default)})"
        )
        if option.boolean_flag:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=option.name, type=str, help=help_text)
    return parser


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)


def load_settings(
    argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults < TOML file (``--config`` or ``PRICEHUB_CONFIG``) < environment < flags."""
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(argv))
    config_path = flags.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(_read_toml(Path(config_path)))
    merged.update(
        {
            option.name: environ[ENV_PREFIX + option.name.upper()]
            for option in OPTIONS
            if ENV_PREFIX + option.name.upper() in environ
        }
    )
    merged.update(flags)
    return Settings.from_mapping(merged, source="configuration")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    table = data.get("pricehub", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [pricehub] must be a table")
    return {key.replace("-", "_"): value for key, value in table.items()}


def example_toml() -> str:
    """The documented example config (``config/pricehub.example.toml``): every key with
    its default. A test keeps the checked-in file equal to this."""
    lines = [
        "# pricehub configuration: every key with its default.",
        "# Use with `python run_server.py --config config/pricehub.example.toml`.",
        "# Precedence: command-line flag > PRICEHUB_<KEY> environment variable > this file",
        "# > default. Keys may also sit under a [pricehub] table.",
        "",
    ]
    defaults = Settings()
    for option in OPTIONS:
        value = getattr(defaults, option.name)
        lines.append(f"# {option.help}")
        lines.append(_toml_line(option.name, value))
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
