"""The chaos soak's analysis: from what clients saw and what the publisher was told, the
counters of issues 13 and 23 (a-d, i, j; e-h are ``chaos_stream``'s) plus declared losses,
closes, failed resumes, latency and server health per fault.

Counter definitions are in bench/README.md ("Chaos soak"); the functions below follow them.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bench.chaos_clients import Body, Recorder, Span
from bench.chaos_faults import Fault
from bench.chaos_publisher import Accepted, PublishLog
from bench.chaos_stream import StreamLog, stream_checks

__all__ = ["FAULT_TAIL", "analyse", "drift", "table"]

FAULT_TAIL = 5.0  # seconds after a fault's end still charged to it
SPAN_LEAD = 0.5  # a client must have been following the zone this long before a publish ...
SPAN_TAIL = 1.0  # ... and this long after its 202, to be expected to receive it
EXAMPLES = 5
GRAVE = (
    "undeclared_gaps", "duplicates", "conflicting_keys", "lost_accepted",
    "stream_duplicates", "stream_reorders", "stream_backlog", "stream_lost",
    "double_acks", "undue_resets",
)  # fmt: skip
NO_STREAM: dict[str, Any] = {
    "counts": {"stream_duplicates": 0, "stream_reorders": 0, "stream_backlog": 0,
               "stream_lost": 0},
    "stream": {"not_run": "no Redis, no ingest stream", "answered": 0, "delivered": 0},
    "examples": {},
}  # fmt: skip


def fault_at(faults: Sequence[Fault], moment: float) -> Fault | None:
    """The fault active at ``moment``, else the one that ended most recently within
    ``FAULT_TAIL`` s, else None."""
    best: Fault | None = None
    for fault in faults:
        end = fault.end if fault.end is not None else float("inf")
        if fault.start <= moment <= end:
            return fault
        if end < moment <= end + FAULT_TAIL and (best is None or (best.end or 0) < end):
            best = fault
    return best


def epoch_at(recorder: Recorder, instance: int, moment: float) -> str | None:
    """The epoch ``instance`` last announced at or before ``moment`` (its first if none)."""
    events = sorted(recorder.epoch_events.get(instance, []))
    if not events:
        return None
    index = bisect.bisect_right([t for t, _ in events], moment)
    return events[max(0, index - 1)][1]


def accepted_epochs(recorder: Recorder, accepted: Accepted) -> set[str]:
    """Where a 202 belongs: the epochs clients received that price in, else the epoch its
    instance announced at the time of the answer."""
    seen = recorder.nonce_epochs.get(accepted.nonce)
    if seen:
        return set(seen)
    epoch = epoch_at(recorder, accepted.instance, accepted.answered)
    return set() if epoch is None else {epoch}


def conflicts(recorder: Recorder, log: PublishLog) -> list[dict[str, Any]]:
    """(c): every (zone, epoch, seq) that names more than one price, across all clients and
    all 202 answers."""
    bodies: dict[tuple[str, str, int], set[Body]] = {
        key: set(counter) for key, counter in recorder.keys.items()
    }
    from_202: set[tuple[str, str, int]] = set()
    for accepted in log.accepted:
        for epoch in accepted_epochs(recorder, accepted):
            key = (accepted.zone, epoch, accepted.seq)
            bodies.setdefault(key, set()).add(accepted.body)
            from_202.add(key)
    return [
        {"zone": key[0], "epoch": key[1], "seq": key[2], "prices": sorted(map(list, found)),
         "named_by_202": key in from_202}
        for key, found in sorted(bodies.items()) if len(found) > 1
    ]  # fmt: skip


def double_acks(recorder: Recorder, log: PublishLog) -> list[dict[str, Any]]:
    """(i): every (zone, epoch, seq) that two 202 answers named (each POST carries its own
    nonce, so two nonces on one key are two prices given one seq), epochs placed as in (c)."""
    named: dict[tuple[str, str, int], list[Accepted]] = {}
    for accepted in log.accepted:
        for epoch in accepted_epochs(recorder, accepted):
            named.setdefault((accepted.zone, epoch, accepted.seq), []).append(accepted)
    return [
        {"zone": zone, "epoch": epoch, "seq": seq,
         "answers": [{"nonce": a.nonce, "instance": a.instance, "answered": a.answered,
                      "received": a.nonce in recorder.nonce_epochs} for a in answers]}
        for (zone, epoch, seq), answers in sorted(named.items())
        if len({a.nonce for a in answers}) > 1
    ]  # fmt: skip


def epoch_ends(recorder: Recorder) -> list[tuple[float, str]]:
    """(time, old epoch) of every epoch change an instance announced."""
    ends = []
    for events in recorder.epoch_events.values():
        for (_, before), (moment, after) in itertools.pairwise(sorted(events)):
            if after != before:
                ends.append((moment, before))
    return ends


def declaration(
    accepted: Accepted,
    epochs: set[str],
    recorder: Recorder,
    faults: Sequence[Fault],
    ends: Sequence[tuple[float, str]],
) -> str | None:
    """How the loss of an unreceived 202 was declared, if it was: a ``gap`` naming its seq,
    or its epoch ended (every client resuming it gets ``recovered: false``) by the recovery
    of the fault it was answered in."""
    for gap in recorder.declared_gaps:
        last = gap["to_seq"] if gap["to_seq"] is not None else float("inf")
        same_line = gap["zone"] == accepted.zone and gap["epoch"] in epochs
        if same_line and gap["from_seq"] <= accepted.seq <= last:
            return "gap"
    fault = fault_at(faults, accepted.answered)
    if fault is not None and any(
        old in epochs and moment >= accepted.answered and fault_at(faults, moment) is fault
        for moment, old in ends
    ):
        return "epoch_change"
    return None


def lost(
    recorder: Recorder, log: PublishLog, faults: Sequence[Fault]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(d): accepted prices no client received although one followed the zone in that epoch
    over the publish (``SPAN_LEAD`` before it to ``SPAN_TAIL`` after its 202) with no declared
    break, and whose loss nothing declared. Also returns the unreceived 202s whose loss was
    declared (``declaration``), and how many unreceived ones no client was placed to see."""
    spans: dict[tuple[str, str], list[Span]] = {}
    for span in recorder.spans:
        spans.setdefault((span.zone, span.epoch), []).append(span)
    ends = epoch_ends(recorder)
    found, declared, unwitnessed = [], [], 0
    for accepted in log.accepted:
        if accepted.nonce in recorder.nonce_epochs:
            continue
        epochs = accepted_epochs(recorder, accepted)
        entry = {
            "zone": accepted.zone, "seq": accepted.seq, "nonce": accepted.nonce,
            "instance": accepted.instance, "epochs": sorted(epochs),
            "answered": accepted.answered,
        }  # fmt: skip
        how = declaration(accepted, epochs, recorder, faults, ends)
        if how is not None:
            fault = fault_at(faults, accepted.answered)
            declared.append(entry | {"declared_by": how, "replication": bool(
                fault is not None and fault.kind.replication)})  # fmt: skip
            continue
        witnesses = {
            span.client
            for epoch in epochs
            for span in spans.get((accepted.zone, epoch), [])
            if span.start <= accepted.sent - SPAN_LEAD and span.end >= accepted.answered + SPAN_TAIL
        }
        if not witnesses:
            unwitnessed += 1
            continue
        found.append(entry | {"witnesses": len(witnesses)})
    return found, declared, unwitnessed


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(quantile: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 1)

    return {"count": len(ordered), "p50": pick(0.50), "p99": pick(0.99), "max": pick(1.0)}


def latency(recorder: Recorder, log: PublishLog, faults: Sequence[Fault]) -> dict[str, Any]:
    """Publish-to-receive ms of live (not replayed) deliveries, inside and outside faults."""
    inside: list[float] = []
    outside: list[float] = []
    for received, nonce in recorder.live:
        sent = log.sent_at.get(nonce)
        if sent is not None:
            target = inside if fault_at(faults, received) else outside
            target.append((received - sent) * 1000)
    return {"inside_faults": percentiles(inside), "outside_faults": percentiles(outside)}


def drift(
    samples: list[dict[str, Any]],
    recorder: Recorder,
    log: PublishLog,
    faults: Sequence[Fault],
    *,
    origin: float,
    every: float,
) -> dict[str, Any]:
    """The samples, each with the p50/p99 of live deliveries outside faults in the window
    that ends at it: latency, RSS and descriptors side by side over a long run."""
    windows: dict[int, list[float]] = {}
    for received, nonce in recorder.live:
        sent = log.sent_at.get(nonce)
        if sent is not None and not fault_at(faults, received):
            windows.setdefault(int((received - origin) // every), []).append(
                (received - sent) * 1000
            )
    rows = []
    for sample in samples:
        window = windows.get(int((sample["t"] - 1e-6) // every), [])
        stats = percentiles(window)
        rows.append(sample | {"latency_ms": {k: stats[k] for k in ("count", "p50", "p99")}})
    return {"every_s": every, "samples": rows}


def mass_closes(recorder: Recorder, faults: Sequence[Fault]) -> list[float]:
    """Times of 1001 closes not explained by their own instance being stopped."""
    stops = [
        (f.plan.target, f.start, f.end if f.end is not None else float("inf"))
        for f in faults if f.plan.kind == "instance_term"
    ]  # fmt: skip
    return [
        moment for moment, instance, code in recorder.closes
        if code == 1001 and not any(t == instance and s <= moment <= e for t, s, e in stops)
    ]  # fmt: skip


def undue_resets(faults: Sequence[Fault], charged: Sequence[Counter[str]]) -> dict[int, int]:
    """(j): per fault that promises its clients no reset (``Fault.no_reset``), the
    ``recovered: false`` resumes and 1001 closes charged to it. Only a master failover that
    lost acknowledged prices and declared it is excused: that declaration may reset
    clients; any other outage shorter than the hold must not."""
    undue = {}
    for index, fault in enumerate(faults):
        resets = charged[index]["recovered_false"] + charged[index]["mass_closes_1001"]
        excused = fault.kind.replication and charged[index]["declared_loss"] > 0
        if fault.no_reset and resets and not excused:
            undue[index] = resets
    return undue


def per_fault(faults: Sequence[Fault], events: Mapping[str, Iterable[float]]) -> list[Counter[str]]:
    """Each event time charged to its fault (``fault_at``); the last entry is outside faults."""
    counters = [Counter(dict.fromkeys(events, 0)) for _ in range(len(faults) + 1)]
    index = {id(fault): i for i, fault in enumerate(faults)}
    for name, times in events.items():
        for moment in times:
            fault = fault_at(faults, moment)
            counters[len(faults) if fault is None else index[id(fault)]][name] += 1
    return counters


def analyse(
    recorder: Recorder,
    log: PublishLog,
    faults: Sequence[Fault],
    *,
    origin: float,
    servers: dict[str, dict[str, int]],
    stream: StreamLog | None,
) -> dict[str, Any]:
    conflicting = conflicts(recorder, log)
    doubled = double_acks(recorder, log)
    streamed = NO_STREAM if stream is None else stream_checks(
        recorder.keys, stream, redis_kills=[t for f in faults for t in f.losses]
    )  # fmt: skip
    lost_prices, declared, unwitnessed = lost(recorder, log, faults)
    mass = mass_closes(recorder, faults)
    events = {
        "non_202": [t for t, _, _ in log.refused],
        "mass_closes_1001": mass,
        "recovered_false": [t for t, _, _ in recorder.not_recovered],
        "undeclared_gaps": [g["time"] for g in recorder.gaps],
        "duplicates": [d["time"] for d in recorder.duplicates],
        "lost_accepted": [a["answered"] for a in lost_prices],
        "declared_loss": [a["answered"] for a in declared],
    }
    charged = per_fault(faults, events)
    undue = undue_resets(faults, charged)
    close_codes = Counter(code for _, _, code in recorder.closes)
    counts = {
        "undeclared_gaps": len(recorder.gaps),
        "duplicates": len(recorder.duplicates),
        "conflicting_keys": len(conflicting),
        "lost_accepted": len(lost_prices),
        **streamed["counts"],
        "double_acks": len(doubled),
        "undue_resets": sum(undue.values()),
        "declared_replication_loss": sum(a["replication"] for a in declared),
        "declared_loss_other": sum(not a["replication"] for a in declared),
        "mass_closes_1001": len(mass),
        "recovered_false": len(recorder.not_recovered),
        "reorders": len(recorder.reorders),
        "undeclared_epoch_switches": len(recorder.epoch_switches),
        "tracebacks": sum(s.get("tracebacks", 0) for s in servers.values()),
        "harness_exceptions": sum(recorder.client_exceptions.values()),
    }
    return {
        "counts": counts,
        "check_failed": any(counts[name] for name in GRAVE),
        "publish": {
            "sent": len(log.sent_at), "accepted": len(log.accepted),
            "statuses": dict(log.statuses), "skipped": log.skipped,
            "accepted_unreceived_unwitnessed": unwitnessed,
            "declared_gaps": len(recorder.declared_gaps),
        },
        "stream": streamed["stream"],
        "clients": {
            "connects": recorder.connects, "connect_failures": dict(recorder.connect_failures),
            "closes_by_code": {str(k): v for k, v in close_codes.items()},
            "recovered_true": recorder.recovered, "live_deliveries": len(recorder.live),
            "replayed": recorder.replayed, "conflated": recorder.conflated,
            "backend_changes": len(recorder.backend_changes), "errors": dict(recorder.errors),
            "harness_exceptions": dict(recorder.client_exceptions),
            "epochs_seen": len({e for ev in recorder.epoch_events.values() for _, e in ev}),
        },
        "faults": [f.as_dict(origin) | dict(c) for f, c in zip(faults, charged, strict=False)],
        "outside_faults": dict(charged[-1]),
        "latency_ms": latency(recorder, log, faults),
        "servers": servers,
        "examples": {
            "undeclared_gaps": recorder.gaps[:EXAMPLES],
            "duplicates": recorder.duplicates[:EXAMPLES],
            "conflicting_keys": conflicting[:EXAMPLES],
            "lost_accepted": lost_prices[:EXAMPLES],
            "double_acks": doubled[:EXAMPLES],
            "undue_resets": [
                faults[i].as_dict(origin) | dict(charged[i]) for i in sorted(undue)
            ][:EXAMPLES],
            "declared_loss": declared[:EXAMPLES],
            "declared_gaps": recorder.declared_gaps[:EXAMPLES],
            "undeclared_epoch_switches": recorder.epoch_switches[:EXAMPLES],
            **streamed["examples"],
        },
    }  # fmt: skip


def table(report: dict[str, Any]) -> str:
    """The report as plain-text tables for a terminal."""
    lines = [
        f"chaos soak: {report['config']['topology']}, seed {report['seed']}, "
        f"{'short' if report['short'] else 'full'}, "
        f"{report['run_seconds']} s, {report['config']['clients']} clients, "
        f"{report['publish']['sent']} POSTs ({report['publish']['accepted']} accepted), "
        f"{report['stream']['answered']} stream entries ({report['stream']['delivered']} "
        "delivered)",
        "",
    ]
    counts = report["counts"]
    lines += ["counter                      value"] + [
        f"{('(' + 'abcdefghij'[GRAVE.index(k)] + ') ') if k in GRAVE else '    '}{k:<25}{v:>6}"
        for k, v in counts.items()
    ]
    columns = (
        "non_202",
        "mass_closes_1001",
        "recovered_false",
        "undeclared_gaps",
        "duplicates",
        "lost_accepted",
        "declared_loss",
    )
    header = f"{'fault':<18}{'tgt':>4}{'start':>7}{'end':>7}" + "".join(
        f"{c[:12]:>13}" for c in columns
    )
    lines += ["", header]
    for fault in report["faults"]:
        lines.append(
            f"{fault['kind'][:17]:<18}{fault['target']:>4}{fault['start']:>7}"
            f"{fault['end'] if fault['end'] is not None else '-':>7}"
            + "".join(f"{fault.get(c, 0):>13}" for c in columns)
        )
    lines += [f"  {fault['kind']}: {fault['skipped']}" for fault in report["faults"]
              if "skipped" in fault]  # fmt: skip
    outside = report["outside_faults"]
    lines.append(f"{'(outside faults)':<36}" + "".join(f"{outside.get(c, 0):>13}" for c in columns))
    lines += ["", "latency ms        count      p50      p99      max"]
    for where, stats in report["latency_ms"].items():
        lines.append(
            f"{where:<16}{stats['count']:>7}{stats['p50']!s:>9}{stats['p99']!s:>9}"
            f"{stats['max']!s:>9}"
        )
    lines += ["", "server        starts  RSS start KiB  RSS end KiB  tracebacks"]
    for name, info in report["servers"].items():
        lines.append(
            f"{name:<14}{info.get('starts', 1):>6}{info['rss_kib_start']:>15}"
            f"{info['rss_kib_end']:>13}{info.get('tracebacks', 0):>12}"
        )
    return "\n".join(lines + drift_lines(report.get("drift")))


def drift_lines(drift: dict[str, Any] | None) -> list[str]:
    """One row per sample: each instance's RSS KiB / descriptors / starts, and the p99 of
    live deliveries outside faults in the window before it."""
    if not drift or not drift["samples"]:
        return []
    names = [k for k in drift["samples"][0] if k not in ("t", "latency_ms")]
    lines = ["", "drift      t s" + "".join(f"{n + ' RSS/fds/starts':>28}" for n in names)
             + "   p99 ms"]  # fmt: skip
    for row in drift["samples"]:
        cells = "".join(
            f"{row[n]['rss_kib']:>14}/{row[n]['fds']:>5}/{row[n]['starts']:>6}" for n in names
        )
        lines.append(f"{'':<6}{row['t']:>8}{cells}{row['latency_ms']['p99']!s:>9}")
    return lines
