"""``pricehub`` / ``python -m pricehub`` / ``run_server.py``: the server, or ``tail``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pricehub.server.errors import ConfigError
from pricehub.server.logs import configure_logging, redact_text
from pricehub.server.settings import load_settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["tail"]:
        from pricehub.client.tail import main as tail_main

        return tail_main(args[1:])
    if args[:1] == ["serve"]:
        args = args[1:]
    try:
        settings = load_settings(args)
    except ConfigError as exc:
        # A mistyped URL may carry a password: redacted like every log line.
        print(f"pricehub: configuration error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    configure_logging(log_format=settings.log_format, level=settings.log_level)
    if settings.workers > 1:
        from pricehub.server.workers import run_workers

        return run_workers(settings)
    from pricehub.server.runner import serve

    return serve(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
