"""Benchmarks only (issue 27): a server started with this directory on ``PYTHONPATH``
journals its ``--data-dir`` with ``SqliteJournal`` instead of ``Journal``, so that
``bench/durable_publish.py --journal both`` can compare the two in one run before
``DurableStorage`` uses SQLite. Python imports ``sitecustomize`` at start by itself."""

import pricehub.storage.durable as _durable
from pricehub.storage.sqlite_journal import SqliteJournal as _SqliteJournal

_durable.Journal = _SqliteJournal  # type: ignore[assignment,attr-defined]  # start() opens it
