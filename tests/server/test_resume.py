"""Seq/resume bookkeeping (sans-I/O)."""

from __future__ import annotations

from pricehub.server.policy.resume import ZoneStream, plan_resume
from pricehub.storage import StoredPrice


def price(seq: int) -> StoredPrice:
    return StoredPrice("pjm", seq, b'{"seq":%d}' % seq)


def test_resume_is_recovered_when_storage_retained_the_missed_seqs() -> None:
    retained = [price(4), price(5)]
    assert plan_resume(since=3, client_epoch="e1", epoch="e1", retained=retained).recovered
    assert plan_resume(since=3, client_epoch=None, epoch="e1", retained=retained).recovered


def test_resume_with_nothing_missed_is_recovered() -> None:
    outcome = plan_resume(since=5, client_epoch=None, epoch="e1", retained=[])
    assert outcome.recovered and outcome.from_seq == 6


def test_resume_fails_on_gap_or_other_epoch() -> None:
    assert not plan_resume(since=1, client_epoch="e1", epoch="e1", retained=None).recovered
    assert not plan_resume(since=1, client_epoch="old", epoch="e1", retained=[price(2)]).recovered


def test_zone_stream_holds_while_syncing_then_releases_only_newer_in_order() -> None:
    stream = ZoneStream("pjm")
    stream.held.extend([price(5), price(6), price(7)])
    released = stream.finish(delivered_up_to=6)
    assert [p.seq for p in released] == [7]
    assert not stream.syncing and not stream.held and stream.last_seq == 7
    assert not stream.accept(7) and not stream.accept(3) and stream.accept(8)


def test_the_hold_is_bounded_and_says_when_storage_must_fill_the_gap() -> None:
    stream = ZoneStream("pjm", held_limit=3)
    stream.held.extend([price(seq) for seq in range(4, 10)])  # 4..9 arrive, 3 are kept
    assert [p.seq for p in stream.held] == [7, 8, 9]
    assert stream.missing_after(5)  # 6 was dropped: read it from storage first
    assert not stream.missing_after(6)  # the hold follows on from 6
    assert [p.seq for p in stream.finish(delivered_up_to=6)] == [7, 8, 9]
    assert not ZoneStream("pjm").missing_after(100)  # nothing held: nothing missing
