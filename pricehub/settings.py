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
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pricehub.exceptions import ConfigError

__all__ = [
    "DEFAULT_ZONES",
    "OPTIONS",
    "Option",
    "Settings",
    "build_parser",
    "example_toml",
    "load_settings",
]

DEFAULT_ZONES = ("pjm", "caiso", "ercot", "nyiso", "miso", "spp", "isone")
ZONE_RE = re.compile(r"^[a-z0-9_]{1,32}$")
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
    """One setting: its name (flag ``--name-with-dashes``), parser and help text."""

    name: str
    parse: Callable[[str], Any]
    help: str
    flag_only_bool: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "address to listen on"),
    Option("port", int, "TCP port to listen on"),
    Option("redis_url", _optional, "Redis URL used when reachable; 'none' = in-memory only"),
    Option("zones", _split, "comma list of market zones served"),
    Option("publish_key", _split, "bearer key(s), comma list; none disables HTTP publishing"),
    Option("simulate", _bool, "built-in price simulator (default: on without publish keys)", True),
    Option("simulate_interval", float, "seconds between simulated ticks per zone"),
    Option("heartbeat_interval", float, "seconds between server pings"),
    Option("heartbeat_timeout", float, "silence (seconds) after which a client is closed (4000)"),
    Option("history_size", int, "price objects retained per zone"),
    Option("allowed_origins", _split, "browser Origins allowed to open sockets; '*' = any"),
    Option("workers", int, "worker processes sharing the port (needs Redis when > 1)"),
    Option("tls_cert", _optional, "PEM certificate: serve https/wss directly"),
    Option("tls_key", _optional, "PEM private key for --tls-cert"),
    Option("log_format", _optional, "'console' or 'json' (default: console on a TTY)"),
    Option("log_level", str, "minimum log level (debug, info, warning, error)"),
    Option("jwt_secret", _optional, "HS256 secret: subscriber tokens required"),
    Option("jwt_public_key", _optional, "PEM file (RS256/ES256): subscriber tokens required"),
    Option("max_frame_size", int, "largest client frame in bytes (bigger: close 1009)"),
    Option("max_connections", int, "open sockets in total (over: 1013 / HTTP 503)"),
    Option("max_connections_per_ip", int, "open sockets per remote address"),
    Option("client_rate_limit", float, "client messages per second per connection (burst 2x)"),
    Option("max_zones_per_socket", int, "zones one multi-zone socket may subscribe to"),
    Option("max_body_size", int, "largest publish request body in bytes (over: 413)"),
    Option("max_batch_size", int, "price objects in one publish request"),
    Option("publish_rate_limit", float, "publish requests per second per key (over: 429)"),
    Option("send_high_water", int, "unsent bytes per socket above which updates are conflated"),
    Option("send_hard_limit", int, "unsent bytes per socket above which it is closed (4008)"),
    Option("slow_consumer_timeout", float, "seconds a socket may stay above high water (4008)"),
    Option("compression", _bool, "permessage-deflate for clients that offer it", True),
    Option("handshake_timeout", float, "seconds a client has to finish the upgrade"),
    Option("shutdown_grace", float, "seconds to drain sockets on shutdown"),
    Option("key_prefix", str, "prefix of every Redis key and channel"),
    Option("redis_timeout", float, "Redis socket timeout in seconds (failover trigger)"),
    Option("redis_probe_interval", float, "seconds between probes of a lost Redis"),
    Option("loop_lag_threshold", float, "event-loop lag (seconds) that makes health degraded"),
)
_OPTION_NAMES = {option.name for option in OPTIONS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """All of pricehub's settings. Build with ``Settings(...)`` or ``load_settings``.

    Defaults are those of ``PROTOCOL.md``'s operator contract.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    zones: tuple[str, ...] = DEFAULT_ZONES
    publish_key: tuple[str, ...] = ()
    # None means "on when no publish key is given" (resolved by ``simulator_enabled``).
    simulate: bool | None = None
    simulate_interval: float = 1.0
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 60.0
    history_size: int = 1000
    allowed_origins: tuple[str, ...] = ()
    workers: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    log_format: str | None = None
    log_level: str = "info"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    max_frame_size: int = 65536
    max_connections: int = 50000
    max_connections_per_ip: int = 1000
    client_rate_limit: float = 20.0
    max_zones_per_socket: int = 64
    max_body_size: int = 1024 * 1024
    max_batch_size: int = 1000
    publish_rate_limit: float = 200.0
    send_high_water: int = 256 * 1024
    send_hard_limit: int = 4 * 1024 * 1024
    slow_consumer_timeout: float = 30.0
    compression: bool = False
    handshake_timeout: float = 10.0
    shutdown_grace: float = 5.0
    key_prefix: str = "pricehub:"
    redis_timeout: float = 0.5
    redis_probe_interval: float = 1.0
    loop_lag_threshold: float = 0.5

    def __post_init__(self) -> None:
        for check in _CHECKS:
            check(self)

    @property
    def simulator_enabled(self) -> bool:
        return (not self.publish_key) if self.simulate is None else self.simulate

    @property
    def auth_enabled(self) -> bool:
        return self.jwt_secret is not None or self.jwt_public_key is not None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "settings") -> Settings:
        """Build from already-typed or string values; unknown keys are an error."""
        unknown = sorted(set(values) - _OPTION_NAMES)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        return cls(**{name: _coerce(name, value, source) for name, value in values.items()})


def _coerce(name: str, value: Any, source: str) -> Any:
    option = next(option for option in OPTIONS if option.name == name)
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


def _check_zones(settings: Settings) -> None:
    if not settings.zones:
        raise ConfigError("zones: at least one zone is required")
    for zone in settings.zones:
        if not ZONE_RE.match(zone):
            raise ConfigError(f"zones: {zone!r} is not a valid zone name ([a-z0-9_]{{1,32}})")
    if len(set(settings.zones)) != len(settings.zones):
        raise ConfigError("zones: duplicate zone names")


def _check_ranges(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {settings.port}")
    if settings.heartbeat_timeout <= settings.heartbeat_interval:
        raise ConfigError("heartbeat_timeout must be greater than heartbeat_interval")
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
    schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://")
    if url is not None and not url.startswith(schemes):
        raise ConfigError(f"redis_url must start with one of {', '.join(schemes)}, got {url!r}")
    if settings.workers > 1 and url is None:
        raise ConfigError("workers > 1 needs Redis: the workers form a cluster through it")


_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _positive(
        "heartbeat_interval", "heartbeat_timeout", "history_size", "workers", "max_frame_size",
        "max_connections", "max_connections_per_ip", "client_rate_limit", "max_zones_per_socket",
        "max_body_size", "max_batch_size", "publish_rate_limit", "send_high_water",
        "send_hard_limit", "slow_consumer_timeout", "handshake_timeout", "simulate_interval",
        "redis_timeout", "redis_probe_interval", "loop_lag_threshold",
    ),
    _check_zones,
    _check_ranges,
    _check_files,
    _check_redis,
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
        help_text = f"{option.help} (default: {_show(default)})"
        if option.flag_only_bool:
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
