"""Settings: precedence flag > environment > TOML file > default, and validation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pricehub.server.errors import ConfigError
from pricehub.server.settings import DEFAULT_ZONES, Settings, example_toml, load_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_contracts() -> None:
    settings = load_settings([], environ={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.zones == DEFAULT_ZONES
    assert (settings.heartbeat_interval, settings.heartbeat_timeout) == (30.0, 60.0)
    assert settings.history_size == 1000 and settings.max_frame_size == 65536
    assert (settings.max_connections, settings.max_connections_per_ip) == (50000, 1000)
    assert settings.client_rate_limit == 20.0 and settings.workers == 1
    assert settings.publish_key == () and settings.simulator_enabled


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text('port = 1111\nhistory_size = 5\nzones = ["pjm"]\nredis_url = "none"\n')
    environ = {"PRICEHUB_PORT": "2222", "PRICEHUB_HISTORY_SIZE": "7"}
    settings = load_settings(["--config", str(config), "--port", "3333"], environ=environ)
    assert settings.port == 3333  # flag
    assert settings.history_size == 7  # environment
    assert settings.zones == ("pjm",)  # file
    assert settings.redis_url is None  # 'none' means in-memory only
    assert settings.heartbeat_interval == 30.0  # default


def test_config_file_from_environment_and_table(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text("[pricehub]\nsimulate = false\npublish-key = ['a', 'b']\n")
    settings = load_settings([], environ={"PRICEHUB_CONFIG": str(config)})
    assert settings.publish_key == ("a", "b") and not settings.simulator_enabled


def test_simulator_defaults_off_with_a_publish_key_unless_asked() -> None:
    assert not load_settings(["--publish-key", "k"], environ={}).simulator_enabled
    assert load_settings(["--publish-key", "k", "--simulate"], environ={}).simulator_enabled
    assert not load_settings(["--no-simulate"], environ={}).simulator_enabled


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "http"], "port: invalid literal"),
        (["--port", "70000"], "port must be 0..65535"),
        (["--zones", "PJM"], "not a valid zone name"),
        (["--zones", "pjm,pjm"], "duplicate"),
        (["--heartbeat-interval", "60", "--heartbeat-timeout", "30"], "heartbeat_timeout"),
        (["--history-size", "0"], "history_size must be > 0"),
        (["--redis-url", "http://x"], "redis_url must start with"),
        (["--workers", "2", "--redis-url", "none"], "workers > 1 needs Redis"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "file not found"),
        (["--tls-cert", "/nonexistent.pem"], "given together"),
        (["--log-format", "xml"], "log_format"),
    ],
)
def test_invalid_settings_say_which_and_why(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(argv, environ={})


def test_bad_environment_and_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings([], environ={"PRICEHUB_PORT": "eighty"})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(["--config", str(broken)], environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'red'")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(["--config", str(unknown)], environ={})
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings(["--config", str(tmp_path / "missing.toml")], environ={})


def test_example_config_documents_every_key_with_its_default() -> None:
    shipped = REPO / "config" / "pricehub.example.toml"
    assert shipped.read_text() == example_toml()
    assert load_settings(["--config", str(shipped)], environ={}) == Settings()


# --- --zones-file (issue 14) ----------------------------------------------------------------


def test_zones_file_reads_names_skipping_comments_and_blank_lines(tmp_path: Path) -> None:
    zones = tmp_path / "zones.txt"
    zones.write_text("# ISO hubs\npjm\n\n  ercot   # trailing comment\n#caiso\nnode_17\n")
    settings = load_settings(
        ["--zones", "miso", "--zones-file", str(zones)], environ={}
    )
    assert settings.zones == ("pjm", "ercot", "node_17")  # replaces --zones, order kept
    assert settings.zone_set == frozenset(settings.zones)
    from_env = load_settings([], environ={"PRICEHUB_ZONES_FILE": str(zones)})
    assert from_env.zones == settings.zones


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pjm\n# fine\nPJM-East\n", r"zones\.txt:3: 'PJM-East' is not a valid zone name"),
        ("pjm\nercot\n\npjm # again\n", r"zones\.txt:4: duplicate zone 'pjm' \(first on line 1\)"),
        ("# nothing but comments\n\n", "no zones in the file"),
        ("a" * 33 + "\n", r"zones\.txt:1: .* is not a valid zone name"),
    ],
)
def test_zones_file_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    zones = tmp_path / "zones.txt"
    zones.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(["--zones-file", str(zones)], environ={})


def test_zones_file_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"zones_file .*missing"):
        load_settings(["--zones-file", str(tmp_path / "missing.txt")], environ={})


def test_a_hundred_thousand_zones_load_fast(tmp_path: Path) -> None:
    zones = tmp_path / "zones.txt"
    zones.write_text("".join(f"node_{i:06d}\n" for i in range(100_000)))
    started = time.perf_counter()
    settings = load_settings(["--zones-file", str(zones)], environ={})
    elapsed = time.perf_counter() - started
    assert len(settings.zones) == len(settings.zone_set) == 100_000
    assert "node_099999" in settings.zone_set
    # Linear: about 0.1 s here. A quadratic check (a tuple scanned per name) takes minutes.
    assert elapsed < 3.0, f"100,000 zones took {elapsed:.2f} s"
    changed = settings.replace(port=1)  # a copy keeps the file's zones
    assert changed.zones == settings.zones and "node_000000" in changed.zone_set
