"""The run's hygiene check (tests/harness/hygiene.py) and where the process harnesses write."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import redisproc, serverproc
from tests.harness.hygiene import Footprint


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in ``data/`` of a checkout (absent) and a stand-in system temp dir."""
    (tmp_path / "checkout").mkdir()
    (tmp_path / "temp").mkdir()
    return tmp_path / "checkout" / "data", tmp_path / "temp"


def test_a_data_dir_the_run_created_is_reported(places: tuple[Path, Path]) -> None:
    data, temp = places
    before = Footprint.take(data, temp)
    assert Footprint.take(data, temp).changes_since(before) == []
    data.mkdir()
    (data / "wal-000000000001.log").write_bytes(b"tick")
    (problem,) = Footprint.take(data, temp).changes_since(before)
    assert f"{data} was created" in problem and "wal-000000000001.log" in problem


def test_a_changed_data_dir_is_reported_an_untouched_one_is_not(
    places: tuple[Path, Path],
) -> None:
    data, temp = places
    data.mkdir()
    (data / "snapshot").write_bytes(b"kept")
    before = Footprint.take(data, temp)
    assert Footprint.take(data, temp).changes_since(before) == []
    (data / "wal-000000000002.log").write_bytes(b"tick")
    (problem,) = Footprint.take(data, temp).changes_since(before)
    assert f"{data} was changed" in problem and "wal-000000000002.log" in problem
    assert "snapshot" not in problem


def test_only_new_pricehub_entries_in_the_temp_dir_are_reported(
    places: tuple[Path, Path],
) -> None:
    data, temp = places
    (temp / "pricehub-41000-old.log").write_text("")  # another run's: not this one's
    before = Footprint.take(data, temp)
    (temp / "pricehub-42000-abcd.log").write_text("")
    (temp / "pricehub-redis-42001-efgh").mkdir()
    (temp / "something-else").write_text("")
    (problem,) = Footprint.take(data, temp).changes_since(before)
    assert "['pricehub-42000-abcd.log', 'pricehub-redis-42001-efgh'] (2 in all)" in problem


def test_the_process_harnesses_write_under_the_sessions_tmp_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.getbasetemp()
    assert serverproc.ServerProcess("--no-simulate").log_path.is_relative_to(base)
    assert redisproc.RedisProcess().unix_socket.is_relative_to(base)
