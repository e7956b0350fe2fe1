"""Settings: precedence flag > environment > TOML file > default, and validation."""

from __future__ import annotations

import os
import re
import time
from dataclasses import fields
from pathlib import Path

import pytest

from pricehub.server.errors import ConfigError, UsageError
from pricehub.server.settings import (
    BOOL,
    DEFAULT_ZONES,
    FLOAT,
    INT,
    OPTIONAL_STR,
    OPTIONS,
    STR,
    STR_LIST,
    Settings,
    build_parser,
    example_toml,
    load_settings,
)
from pricehub.wire.messages import is_valid_zone_name

REPO = Path(__file__).resolve().parents[2]


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
        (["--port", "http"], "--port: expected an integer, got 'http'"),
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
    with pytest.raises(ConfigError, match="PRICEHUB_PORT: expected an integer, got 'eighty'"):
        load_settings([], environ={"PRICEHUB_PORT": "eighty"})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(["--config", str(broken)], environ={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'red'")
    with pytest.raises(ConfigError, match=r"unknown setting colour in \S+unknown\.toml$"):
        load_settings(["--config", str(unknown)], environ={})
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings(["--config", str(tmp_path / "missing.toml")], environ={})


def test_example_config_documents_every_key_with_its_default() -> None:
    shipped = REPO / "config" / "pricehub.example.toml"
    assert shipped.read_text() == example_toml()
    assert load_settings(["--config", str(shipped)], environ={}) == Settings()


# --- one typed parser for every source (issue 22) ----------------------------------------


def load_one(tmp_path: Path, source: str, name: str, value: str) -> Settings:
    """Settings with one option given by one source: ``value`` is text for a flag or an
    environment variable, a TOML literal for the file (``tmp_path / "p.toml"``)."""
    if source == "flag":
        return load_settings(["--" + name.replace("_", "-"), value], environ={})
    if source == "env":
        return load_settings([], environ={"PRICEHUB_" + name.upper(): value})
    config = tmp_path / "p.toml"
    config.write_text(f"{name} = {value}\n")
    return load_settings(["--config", str(config)], environ={})


@pytest.mark.parametrize(
    ("source", "name", "value", "message"),
    [
        ("flag", "history_size", "10.5", "--history-size: expected an integer, got '10.5'"),
        ("env", "history_size", "10.5", "PRICEHUB_HISTORY_SIZE: expected an integer, got '10.5'"),
        ("toml", "history_size", "10.5",
         "history_size in {file}: expected an integer, got 10.5 (a float)"),
        ("flag", "max_connections", "true", "--max-connections: expected an integer, got 'true'"),
        ("toml", "max_connections", "true",
         "max_connections in {file}: expected an integer, got true (a boolean)"),
        ("toml", "port", '"8080"', "port in {file}: expected an integer, got '8080' (a string)"),
        ("env", "heartbeat_interval", "inf",
         "PRICEHUB_HEARTBEAT_INTERVAL: expected a number, got 'inf'"),
        ("flag", "heartbeat_interval", "nan", "--heartbeat-interval: expected a number, got 'nan'"),
        ("toml", "heartbeat_interval", "nan",
         "heartbeat_interval in {file}: expected a number, got nan (a float)"),
        ("toml", "heartbeat_interval", "true",
         "heartbeat_interval in {file}: expected a number, got true (a boolean)"),
        ("env", "compression", "maybe",
         "PRICEHUB_COMPRESSION: expected true or false, got 'maybe'"),
        ("toml", "simulate", "0", "simulate in {file}: expected true or false, got 0 (an integer)"),
        ("toml", "compression", '"false"',
         "compression in {file}: expected true or false, got 'false' (a string)"),
        ("toml", "zones", "5", "zones in {file}: expected an array of strings or a "
                               "comma-separated string, got 5 (an integer)"),
        ("toml", "zones", "[1, 2]", "zones in {file}: expected an array of strings or a "
                                    "comma-separated string, got [1, 2] (an array)"),
        ("toml", "host", "127", "host in {file}: expected a string, got 127 (an integer)"),
        ("toml", "tls_cert", "false",
         "tls_cert in {file}: expected a string ('none': unset), got false (a boolean)"),
        ("toml", "log_level", "2024-01-01",
         "log_level in {file}: expected a string, got 2024-01-01 (a date)"),
    ],
)  # fmt: skip
def test_a_wrong_type_names_the_key_as_its_source_spells_it(
    tmp_path: Path, source: str, name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_one(tmp_path, source, name, value)
    assert str(caught.value) == message.format(file=tmp_path / "p.toml")


def test_each_source_gives_values_of_the_options_type(tmp_path: Path) -> None:
    config = tmp_path / "p.toml"
    config.write_text(
        'heartbeat_interval = 40\nzones = "pjm, ercot"\ncompression = true\n'
        'redis_url = "none"\nmax-frame-size = 1_024\n'
    )
    environ = {"PRICEHUB_SIMULATE": "off", "PRICEHUB_SEND_MAX_LAG": "1.5"}
    settings = load_settings(["--config", str(config), "--port", "+81"], environ=environ)
    assert settings.heartbeat_interval == 40.0 and type(settings.heartbeat_interval) is float
    assert settings.zones == ("pjm", "ercot")  # a comma string in TOML too, as the flag
    assert settings.compression is True and settings.redis_url is None
    assert settings.max_frame_size == 1024 and settings.port == 81
    assert settings.simulate is False and settings.send_max_lag == 1.5


def test_every_option_is_read_as_its_declared_type() -> None:
    kinds = {"int": INT, "float": FLOAT, "str": STR, "str | None": OPTIONAL_STR,
             "tuple[str, ...]": STR_LIST, "bool": BOOL, "bool | None": BOOL}  # fmt: skip
    declared = {f.name: f.type for f in fields(Settings)}
    for option in OPTIONS:
        assert option.kind is kinds[str(declared[option.name])], option.name


def test_from_mapping_checks_types_too() -> None:
    with pytest.raises(ConfigError, match=r"^settings: history_size: expected an integer"):
        Settings.from_mapping({"history_size": 10.5})
    typed = Settings.from_mapping({"history_size": "7", "zones": ["pjm"], "workers": 1})
    assert (typed.history_size, typed.zones, typed.workers) == (7, ("pjm",), 1)


def test_unknown_pricehub_variables_are_warnings_naming_the_closest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    warnings: list[str] = []
    environ = {"PRICEHUB_PROT": "1", "PRICEHUB_HISTORY_SIZE": "5", "PRICEHUB_FOO": "x",
               "PRICEHUB_IN_PROJECT_VENV": "1", "PRICEHUB_DEPS": "latest", "HOME": "/"}  # fmt: skip
    settings = load_settings([], environ=environ, warn=warnings.append)
    assert warnings == [
        "PRICEHUB_FOO is not a pricehub setting, ignored",
        "PRICEHUB_PROT is not a pricehub setting, ignored (did you mean PRICEHUB_PORT?)",
    ]
    assert (settings.history_size, settings.port) == (5, 8080)
    load_settings([], environ={"PRICEHUB_REDIS_UR": "none"})  # default: one line on stderr
    assert capsys.readouterr().err == (
        "pricehub: warning: PRICEHUB_REDIS_UR is not a pricehub setting, ignored "
        "(did you mean PRICEHUB_REDIS_URL?)\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", r"unknown setting prot in \S+p\.toml \(did you mean port\?\)"),
        ("publish-kye = 'k'\nfoo = 1\n",
         r"unknown settings in \S+p\.toml: publish-kye \(did you mean publish-key\?\), foo"),
        ("[pricehub]\nport = 1\n[pricehub.tls]\ncert = 'x'\n",
         r"unknown setting tls in \S+ \(did you mean tls_key\?\)"),
        # Keys above [pricehub] would otherwise be ignored without a word.
        ("port = 1\n[pricehub]\nhost = 'x'\n",
         r"config file \S+: port outside the \[pricehub\] table \(put every setting in it, "
         r"or use no table\)"),
        ("publish-key = 'a'\npublish_key = 'b'\n",
         r"config file \S+: publish-key and publish_key are one setting"),
    ],
)  # fmt: skip
def test_config_file_keys_that_are_no_setting_are_errors(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "p.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(["--config", str(config)], environ={})
    assert re.fullmatch(message, str(caught.value)), str(caught.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prot", "1"], "unknown option --prot (did you mean --port?); see --help"),
        # No abbreviations: --por would be --port only until an option --porX is added.
        (["--por=1"], "unknown option --por (did you mean --port?); see --help"),
        (["--no-compresion"], "unknown option --no-compresion (did you mean --no-compression?); "
                              "see --help"),
        (["--zzzz"], "unknown option --zzzz; see --help"),
        (["tial", "pjm"], "unexpected argument 'tial' (did you mean tail?); see --help"),
        (["--port"], "argument --port: expected one argument; see --help"),
    ],
)  # fmt: skip
def test_command_line_mistakes_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        load_settings(argv, environ={})
    assert str(caught.value) == message


def test_a_data_dir_that_is_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^data_dir: \S+file is not a directory$"):
        load_settings(["--data-dir", str(tmp_path / "file")], environ={})


def test_help_and_example_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ./data a file: the default data dir is invalid here, yet --help must still work.
    (tmp_path / "data").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert "(default: data)" in " ".join(build_parser().format_help().split())
    assert 'data_dir = "data"' in example_toml()


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


# --- --zones-file and zone names, settled (issue 23, item 9) --------------------------------


def test_zones_file_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """``str.splitlines`` also splits at U+2028, VT, FF...: one line with those inside is
    one (invalid) name, not several zones; CRLF files still read."""
    zones = tmp_path / "zones.txt"
    zones.write_bytes(b"pjm\r\nercot\r\n")
    assert load_settings(["--zones-file", str(zones)], environ={}).zones == ("pjm", "ercot")
    for separator in ("\u2028", "\x0b", "\x0c", "\x1c", "\x85"):
        zones.write_text(f"pjm\nercot{separator}caiso\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"zones\.txt:2: .* is not a valid zone name"):
            load_settings(["--zones-file", str(zones)], environ={})


def test_zones_file_may_start_with_a_utf8_bom(tmp_path: Path) -> None:
    zones = tmp_path / "zones.txt"
    zones.write_bytes(b"\xef\xbb\xbfpjm\nercot\n")  # what some Windows editors write
    assert load_settings(["--zones-file", str(zones)], environ={}).zones == ("pjm", "ercot")


def test_zones_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO used to block start-up forever (opening it waits for a writer)."""
    fifo = tmp_path / "zones.fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path, Path("/dev/zero")):
        with pytest.raises(ConfigError, match=r"^zones_file \S+: not a regular file$"):
            load_settings(["--zones-file", str(path)], environ={})


@pytest.mark.parametrize("zone", ["pjm\n", "pjm\r\n", "\npjm"])
def test_a_zone_name_with_a_newline_is_invalid(zone: str) -> None:
    """``^...$`` with ``match`` accepted a trailing newline; names are matched whole."""
    assert not is_valid_zone_name(zone)
    with pytest.raises(ConfigError, match="is not a valid zone name"):
        Settings(redis_url=None, zones=(zone, "ercot"))
