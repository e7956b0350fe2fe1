"""Benchmarks only (issue 27): a server started with this directory on ``PYTHONPATH``
journals its ``--data-dir`` with the old journal (``legacy.journal.Journal``) instead of
the default ``SqliteJournal``, so that ``bench/durable_publish.py --journal both`` can
compare the two in one run. Python imports ``sitecustomize`` at start by itself."""

import pricehub.storage.durable as _durable
from pricehub.storage.legacy.journal import Journal as _LegacyJournal

_durable.SqliteJournal = _LegacyJournal  # type: ignore[assignment,misc]  # start() opens it
