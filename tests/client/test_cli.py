"""The command line as operators meet it (issue 22): ``python -m pricehub`` run for real,
from a temporary working directory, for its error paths, ``--version`` and ``--help``.

Every run that should fail also names a private data dir, in-memory storage and port 0,
so that a run that wrongly starts touches nothing shared (it is then killed by the
timeout and the test fails).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pricehub import __version__
from tests.harness.redisproc import RedisProcess
from tests.harness.serverproc import free_port
from tests.harness.support import WAIT

REPO = Path(__file__).resolve().parents[2]


def pricehub(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m pricehub ARGS`` in ``tmp_path``, with no PRICEHUB_* variable of ours."""
    environ = {name: val for name, val in os.environ.items() if not name.startswith("PRICEHUB_")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pricehub", *args], cwd=tmp_path, env=environ,
        capture_output=True, text=True, timeout=WAIT * 2, check=False,
    )  # fmt: skip


def isolated(tmp_path: Path, *, port: int = 0, redis_url: str = "none") -> list[str]:
    return ["--port", str(port), "--redis-url", redis_url, "--no-simulate",
            "--log-format", "json", "--data-dir", str(tmp_path / "data")]  # fmt: skip


def fails_with(result: subprocess.CompletedProcess[str], *lines: str) -> None:
    """Exit 2, nothing on stdout, and exactly ``lines`` on stderr."""
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", list(lines))


# --- wrong types, wherever the value comes from ------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("history_size = 10.5", "history_size in {path}: expected an integer, got 10.5 (a float)"),
        ("zones = 5", "zones in {path}: expected an array of strings or a comma-separated "
                      "string, got 5 (an integer)"),
        ("max_connections = 10.5", "max_connections in {path}: expected an integer, got 10.5 "
                                   "(a float)"),
        ("max_connections = true", "max_connections in {path}: expected an integer, got true "
                                   "(a boolean)"),
        ("simulate = 0", "simulate in {path}: expected true or false, got 0 (an integer)"),
        ("workers = 1.5", "workers in {path}: expected an integer, got 1.5 (a float)"),
    ],
)  # fmt: skip
def test_a_wrong_type_in_the_config_file_is_one_line_naming_key_and_file(
    tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "pricehub.toml"
    config.write_text(toml + "\n")
    result = pricehub(tmp_path, "--config", str(config), *isolated(tmp_path))
    fails_with(result, "pricehub: configuration error: " + message.format(path=config))


def test_a_wrong_type_in_a_flag_or_variable_names_it_as_spelled(tmp_path: Path) -> None:
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path), "--history-size", "10.5"),
        "pricehub: configuration error: --history-size: expected an integer, got '10.5'",
    )
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path), env={"PRICEHUB_HISTORY_SIZE": "10.5"}),
        "pricehub: configuration error: PRICEHUB_HISTORY_SIZE: expected an integer, got '10.5'",
    )
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path), "--port", "abc"),
        "pricehub: configuration error: --port: expected an integer, got 'abc'",
    )


# --- unknown names -----------------------------------------------------------------------


def test_an_unknown_option_is_one_line_with_the_closest_one(tmp_path: Path) -> None:
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path), "--prot", "8080"),
        "pricehub: unknown option --prot (did you mean --port?); see --help",
    )
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path), "--history-size"),
        "pricehub: argument --history-size: expected one argument; see --help",
    )


def test_a_misspelled_variable_is_a_warning_naming_the_closest_setting(tmp_path: Path) -> None:
    # An invalid port ends the run right after the warnings; run_server.py's own marker
    # variable is no setting and no warning.
    env = {"PRICEHUB_HISTORY_SIZ": "5", "PRICEHUB_IN_PROJECT_VENV": "1"}
    result = pricehub(tmp_path, *isolated(tmp_path), "--port", "70000", env=env)
    fails_with(
        result,
        "pricehub: warning: PRICEHUB_HISTORY_SIZ is not a pricehub setting, ignored "
        "(did you mean PRICEHUB_HISTORY_SIZE?)",
        "pricehub: configuration error: port must be 0..65535, got 70000",
    )


def test_an_unknown_key_in_the_config_file_names_the_closest_one(tmp_path: Path) -> None:
    config = tmp_path / "pricehub.toml"
    config.write_text("prot = 8080\n")
    fails_with(
        pricehub(tmp_path, "--config", str(config), *isolated(tmp_path)),
        f"pricehub: configuration error: unknown setting prot in {config} (did you mean port?)",
    )


# --- start errors: one line on stderr, in JSON log mode too ------------------------------


def start_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start printed; every other stderr line is a JSON log line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    other = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            json.loads(line)
    assert len(other) == 1, result.stderr
    return other[0]


def test_a_data_dir_that_is_a_file_says_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("a file")
    fails_with(
        pricehub(tmp_path, *isolated(tmp_path)),
        f"pricehub: configuration error: data_dir: {tmp_path / 'data'} is not a directory",
    )


TLS_ERROR = (
    "pricehub: configuration error: tls_cert cert.pem / tls_key key.pem cannot be loaded: "
    "[SSL] PEM lib (not a PEM certificate and private key)"
)


def bad_tls_files(tmp_path: Path) -> list[str]:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    return ["--tls-cert", "cert.pem", "--tls-key", "key.pem"]


def test_unloadable_tls_files_are_one_line(tmp_path: Path) -> None:
    result = pricehub(tmp_path, *isolated(tmp_path), *bad_tls_files(tmp_path))
    assert start_error(result) == TLS_ERROR


def test_unloadable_tls_files_with_workers_are_one_line_not_one_per_worker(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    flags = isolated(tmp_path, port=free_port(), redis_url=redis_server.url)
    result = pricehub(tmp_path, *flags, "--workers", "2", *bad_tls_files(tmp_path))
    assert start_error(result) == TLS_ERROR


def test_an_unloadable_subscriber_key_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "jwt.pem").write_text("not a key\n")
    result = pricehub(tmp_path, *isolated(tmp_path), "--jwt-public-key", "jwt.pem")
    line = start_error(result)
    assert line.startswith(
        "pricehub: configuration error: jwt_public_key: jwt.pem: not a PEM public key"
    ), line


# --- --version and --help ----------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = pricehub(tmp_path, "--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"pricehub {__version__}\n", "")


def test_help_names_tail_the_variables_their_precedence_and_readme_defaults(
    tmp_path: Path,
) -> None:
    result = pricehub(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines where it likes
    assert "pricehub tail --help" in text
    assert "environment variable PRICEHUB_<NAME>" in text and "PRICEHUB_CONFIG" in text
    assert "Precedence: flag > environment variable > config file > default." in text
    # As the README's configuration table shows them.
    assert "permessage-deflate for clients that offer it (default: off)" in text
    assert "seconds between server pings (default: 30)" in text
