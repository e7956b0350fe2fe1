"""``pricehub`` / ``python -m pricehub`` / ``run_server.py``: the server, or ``tail``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pricehub.server.settings import Settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tail"]:
        from pricehub.client.tail import main as tail_main

        return tail_main(args[1:])
    if args[:1] == ["serve"]:
        args = args[1:]
    return _serve(args)


def _serve(args: list[str]) -> int:
    # Imported here, not at the top: ``pricehub tail`` is a client and loads none of the
    # server (nor the storage, Redis and logging libraries behind it).
    from pricehub.server.errors import ConfigError, error_line
    from pricehub.server.logs import configure_logging

    try:
        settings = _checked_settings(args)
    except ConfigError as exc:  # a usage error too: one line, exit 2
        print(error_line(exc), file=sys.stderr)
        return 2
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    if settings.workers > 1:
        from pricehub.server.workers import run_workers

        return run_workers(settings)
    from pricehub.server.runner import serve

    return serve(settings)


def _checked_settings(args: list[str]) -> Settings:
    """The settings, with the files they name loaded once (TLS, subscriber key) before
    anything starts or forks."""
    from pricehub.server.settings import load_settings

    settings = load_settings(args)
    # Imported only for good settings: --help and a typo stay quick.
    from pricehub.server.runner import preflight

    preflight(settings)
    return settings


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
