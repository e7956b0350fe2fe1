"""Turning load-client reports into numbers, tables and issue 4's target checks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "idle_table",
    "merge_reports",
    "record",
    "slow_table",
    "stream_table",
    "summarise",
    "target_checks",
]

Run = dict[str, Any]


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the ``report`` events of several load-client processes."""
    merged: dict[str, Any] = {
        "histogram": Counter(),
        "accepted_histogram": Counter(),
        "close_codes": Counter(),
        "max_latency_us": 0.0,
    }
    for report in reports:
        for key, value in report.items():
            if key in ("histogram", "accepted_histogram", "close_codes"):
                merged[key].update({k: int(v) for k, v in value.items()})
            elif key == "max_latency_us":
                merged[key] = max(merged[key], value)
            elif isinstance(value, int | float):
                merged[key] = merged.get(key, 0) + value
    return merged


def percentile_ms(histogram: Counter[str], fraction: float) -> float | None:
    # Imported here: loadclient needs picows, and ``run.py --record-from`` (which only
    # copies saved tables) must work without the bench extra installed.
    from loadclient import bucket_value

    total = sum(histogram.values())
    running = 0
    for bucket in sorted(histogram, key=int):
        running += histogram[bucket]
        if running >= fraction * total:
            return bucket_value(int(bucket)) / 1000
    return None


def summarise(merged: dict[str, Any], expected_per_client: int) -> dict[str, Any]:
    """The numbers the tables show for one group of clients (readers, or the stalled ones)."""
    histogram = merged["histogram"]
    connections = merged.get("connections", 0)
    return {
        "connections": connections,
        "deliveries_in_window": merged.get("deliveries_in_window", 0),
        "measured_deliveries": merged.get("measured_deliveries", 0),
        "p50_ms": percentile_ms(histogram, 0.50),
        "p99_ms": percentile_ms(histogram, 0.99),
        "max_ms": merged["max_latency_us"] / 1000,
        # pricehub's accepted_at -> client receive (None for servers that send none)
        "accepted_p99_ms": percentile_ms(merged.get("accepted_histogram", Counter()), 0.99),
        "expected": expected_per_client * connections,
        "missing": merged.get("missing", 0),
        "clients_with_loss": merged.get("clients_with_loss", 0),
        "out_of_order": merged.get("out_of_order", 0),
        "duplicates": merged.get("duplicates", 0),
        "conflated": merged.get("conflated", 0),
        "frames": merged.get("frames", 0),
        "close_codes": dict(merged["close_codes"]),
    }


# ----------------------------------------------------------------------------- tables


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def _find(runs: list[Run], name: str) -> Run | None:
    return next((run for run in runs if run["server"] == name), None)


def _field(run: Run | None, key: str) -> float | None:
    return run[key] if run else None


def _cpu(run: Run | None) -> float | None:
    return _field(run, "cpu_us_per_delivery")


def _p99(run: Run | None) -> float | None:
    return run["readers"]["p99_ms"] if run else None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _loss(readers: dict[str, Any]) -> str:
    if not readers["expected"]:
        return "-"
    return f"{readers['missing']} ({100 * readers['missing'] / readers['expected']:.2f}%)"


def stream_table(runs: list[Run]) -> str:
    naive, ceiling = _find(runs, "naive"), _find(runs, "ceiling")
    header = [
        "server", "clients", "deliveries/s", "CPU µs/delivery", "CPU x naive", "server core %",
        "p50 ms", "p99 ms", "max ms", "accepted->recv p99 ms", "p99 x naive", "p99 x ceiling",
        "lost", "order/dup errors",
        "RSS MiB", "clients core %", "others core %",
    ]  # fmt: skip
    rows = []
    for run in runs:
        readers = run["readers"]
        rows.append([
            run["server"], f"{run['connected']}/{run['clients']}", fmt(run["deliveries_per_s"], 0),
            fmt(_cpu(run), 2), ratio(_cpu(run), _cpu(naive)), fmt(run["server_core_pct"], 0),
            fmt(readers["p50_ms"]), fmt(readers["p99_ms"]), fmt(readers["max_ms"]),
            fmt(readers.get("accepted_p99_ms")), ratio(_p99(run), _p99(naive)),
            ratio(_p99(run), _p99(ceiling)), _loss(readers),
            str(readers["out_of_order"] + readers["duplicates"]), fmt(run["rss_mib"]),
            fmt(run["client_core_pct"], 0), fmt(run["others_core_pct"], 0),
        ])  # fmt: skip
    return markdown_table(header, rows)


def slow_table(without: list[Run], with_slow: list[Run]) -> str:
    header = [
        "server", "readers p99 ms without", "with slow client", "with/without", "max ms with",
        "readers lost (with)", "slow client end", "server RSS MiB (window start -> end, peak)",
        "publishes skipped/failed", "others core % without/with",
    ]  # fmt: skip
    rows = []
    for run in with_slow:
        base = _find(without, run["server"])
        base_p99 = _p99(base)
        readers, slow = run["readers"], run["stalled"]
        codes = ", ".join(f"closed {code}" for code in slow["close_codes"]) or "open"
        rows.append([
            run["server"], fmt(base_p99), fmt(_p99(run)), ratio(_p99(run), base_p99),
            fmt(readers["max_ms"]), _loss(readers),
            f"{codes}; {slow['conflated']} conflated; {slow['frames']} frames",
            f"{run['rss_start_mib']:.1f} -> {run['rss_mib']:.1f}, {run['rss_peak_mib']:.1f}",
            f"{run['publish_skipped']}/{sum(run['publish_failed'].values())}",
            f"{fmt(_field(base, 'others_core_pct'), 0)}/{fmt(run['others_core_pct'], 0)}",
        ])  # fmt: skip
    return markdown_table(header, rows)


def idle_table(runs: list[Run]) -> str:
    naive = _find(runs, "naive")
    header = [
        "server", "connected", "handshakes/s", "x naive", "server CPU µs/handshake",
        "RSS KiB/connection", "x naive", "RSS MiB before -> after", "others core %",
    ]  # fmt: skip
    rows = []
    for run in runs:
        rate, per_conn = run["handshakes_per_s"], run["rss_kib_per_connection"]
        rows.append([
            run["server"], f"{run['connected']}/{run['connections']}", fmt(rate, 0),
            ratio(rate, _field(naive, "handshakes_per_s")), fmt(run["cpu_us_per_handshake"], 0),
            fmt(per_conn), ratio(per_conn, _field(naive, "rss_kib_per_connection")),
            f"{run['rss_before_mib']:.1f} -> {run['rss_after_mib']:.1f}",
            fmt(run["others_core_pct"], 0),
        ])  # fmt: skip
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- targets


def _check(label: str, value: float | None, limit: float, *, at_most: bool = True) -> str:
    if value is None:
        return f"- {label}: not measured"
    met = value <= limit if at_most else value >= limit
    sign = "<=" if at_most else ">="
    return f"- {label}: {value:,.2f} (target {sign} {limit:g}): {'met' if met else 'MISSED'}"


def _over(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def target_checks(results: dict[str, list[Run]]) -> list[str]:
    """Issue 4's targets for pricehub, each with the value measured; [] without pricehub."""
    lines: list[str] = []

    def find(key: str) -> Run | None:
        return _find(results.get(key, []), "pricehub")

    if mine := find("1"):
        s1 = results["1"]
        lines.append(
            _check("S1 CPU/delivery vs naive", _over(_cpu(mine), _cpu(_find(s1, "naive"))), 0.80)
        )
        lines.append(
            _check(
                "S1 p99 vs raw ceiling's p99", _over(_p99(mine), _p99(_find(s1, "ceiling"))), 1.10
            )
        )
        lines.append(_check("S1 lost deliveries", mine["readers"]["missing"], 0))
    if mine := find("2"):
        lines.append(_check("S2 p99 ms", _p99(mine), 100))
        lines.append(
            _check(
                "S2 CPU/delivery vs naive",
                _over(_cpu(mine), _cpu(_find(results["2"], "naive"))),
                0.35,
            )
        )
    if mine := find("3"):
        lines.append(_check("S3 KiB per idle connection", mine["rss_kib_per_connection"], 20))
        lines.append(_check("S3 handshakes/s", mine["handshakes_per_s"], 1000, at_most=False))
    if mine := find("4"):
        lines.append(
            _check(
                "S4 readers' p99 with/without the slow client",
                _over(_p99(mine), _p99(find("4-without"))),
                2.0,
            )
        )
        slow = mine["stalled"]
        ended = slow["conflated"] > 0 or "4008" in slow["close_codes"]
        lines.append(
            f"- S4 slow client ends conflated or closed with 4008: {'met' if ended else 'MISSED'}"
            f" (close codes: {', '.join(slow['close_codes']) or 'none'};"
            f" {slow['conflated']} conflated frames)"
        )
        lines.append(
            f"- S4 server RSS bounded: {mine['rss_start_mib']:.1f} MiB at window start,"
            f" {mine['rss_mib']:.1f} at end, peak {mine['rss_peak_mib']:.1f}"
        )
    return lines


def record(sections: dict[int, str], path: Path) -> None:
    """Replace each given scenario's generated block in RESULTS.md (appending the blocks it does
    not have yet), keeping every other scenario's block and the hand-written text around them."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    for scenario, section in sections.items():
        begin, end = (
            f"<!-- bench:scenario {scenario} -->",
            f"<!-- bench:end scenario {scenario} -->",
        )
        block = f"{begin}\n{section}\n{end}"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:  # before the first block of a later scenario, to keep them in order
            later = [mark for n in range(scenario + 1, 10)
                     if (mark := f"<!-- bench:scenario {n} -->") in text]  # fmt: skip
            if later:
                head, rest = text.split(later[0], 1)
                text = f"{head}{block}\n\n{later[0]}{rest}"
            else:
                text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)
