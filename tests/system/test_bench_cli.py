"""The bench drivers' command lines refuse what would do the wrong thing (issue 22.7):
recording a ``--quick`` smoke run over RESULTS.md's full tables, ``--profile`` without py-spy.

Nothing here measures anything or runs a bench. ``bench/run.py`` runs from a copy of bench/ in
a temporary directory, so the RESULTS.md it may write is that copy's, never the checkout's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.serverproc import REPO

WAIT = 30.0
FULL_COMMAND = "Command: `python bench/run.py --scenario 1`."
QUICK_COMMAND = "Command: `python bench/run.py --quick --scenario 1`."


def section(command: str) -> str:
    return f"### Scenario 1: 2000 subscribers\n\nMachine: test. {command}\n\n| new table |"


@pytest.fixture
def bench_copy(tmp_path: Path) -> Path:
    """bench/ copied (its own RESULTS.md included), without the logs of earlier runs."""
    copy = tmp_path / "bench"
    shutil.copytree(REPO / "bench", copy, ignore=shutil.ignore_patterns("out", "__pycache__"))
    return copy


def run_bench(
    script: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=script.parent.parent, env=env,
        capture_output=True, text=True, timeout=WAIT, check=False,
    )  # fmt: skip


def saved_run(directory: Path, content: dict[str, Any]) -> Path:
    directory.mkdir()
    (directory / "results.json").write_text(json.dumps(content))
    return directory


@pytest.mark.parametrize(
    "content",
    [
        pytest.param({"sections": {"1": section(QUICK_COMMAND)}, "quick": True}, id="flagged"),
        # results.json written before ``quick`` was saved: only the command line says so.
        pytest.param({"sections": {"1": section(QUICK_COMMAND)}}, id="older-file"),
    ],
)
def test_record_from_refuses_a_quick_run(
    bench_copy: Path, tmp_path: Path, content: dict[str, Any]
) -> None:
    results = bench_copy / "RESULTS.md"
    before = results.read_text()
    run = saved_run(tmp_path / "quick-run", content)
    result = run_bench(bench_copy / "run.py", "--record-from", str(run))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--quick" in lines[0] and "not recorded" in lines[0], result
    assert results.read_text() == before


def test_record_from_records_a_full_run(bench_copy: Path, tmp_path: Path) -> None:
    run = saved_run(tmp_path / "full-run", {"sections": {"1": section(FULL_COMMAND)}})
    result = run_bench(bench_copy / "run.py", "--record-from", str(run))
    assert result.returncode == 0, result
    recorded = (bench_copy / "RESULTS.md").read_text()
    block = recorded.split("<!-- bench:scenario 1 -->", 1)[1].split("<!-- bench:end", 1)[0]
    assert block.strip() == section(FULL_COMMAND)


def test_record_from_an_unfinished_run_is_one_line(bench_copy: Path, tmp_path: Path) -> None:
    run = saved_run(tmp_path / "interrupted", {"shown": {}, "all": {}})
    result = run_bench(bench_copy / "run.py", "--record-from", str(run))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result


def test_quick_with_record_is_refused_before_anything_runs(
    bench_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_bench(bench_copy / "run.py", "--quick", "--record", "--out", str(out))
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1 and "--quick" in result.stderr, result
    assert not out.exists(), "the run started"


def test_burst_profile_without_py_spy_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"  # a PATH with nothing on it: no py-spy, whatever is installed
    empty.mkdir()
    out = tmp_path / "out"
    small = ["--cases", "memory-http", "--zones", "10", "--clients", "2",
             "--zones-per-client", "2", "--bursts", "1", "--out", str(out)]  # fmt: skip
    result = run_bench(REPO / "bench" / "burst.py", "--profile", *small, env={"PATH": str(empty)})
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [
        "bench/burst.py: py-spy is not on the PATH (--profile needs it: pip install py-spy)"
    ], result
    assert not out.exists(), "the run started"
