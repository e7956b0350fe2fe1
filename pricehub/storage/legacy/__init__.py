"""The journal pricehub wrote before SQLite (a write-ahead log of framed, CRC'd records
plus snapshots): kept only to read an existing data dir once and migrate it into
``sqlite_journal`` (``migrate``). Nothing serves from it; ``journal`` and ``format`` are
the old engine unchanged, so its recovery rules (torn tails cut, damage moved aside)
apply to what is migrated exactly as they did to what it served."""
