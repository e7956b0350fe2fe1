#!/usr/bin/env python3
"""Start one pricehub instance: ``python3 run_server.py --help`` lists the flags.

On a fresh checkout, when the running Python lacks pricehub's dependencies, this makes the
project's own venv (``.venv/``, from the committed lock ``requirements/run.txt``) once and
runs there: a stock Debian/Ubuntu ``python3`` is "externally managed" (PEP 668) and is never
installed into. A Python that already has them (an activated venv, say) is used as it is.
"""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = ("aiohttp", "redis", "orjson", "structlog", "prometheus_client", "jwt")
# Set before re-running in the venv: a venv that still lacks a dependency is an error to
# report, not a reason to make it again (and again).
REEXEC = "PRICEHUB_IN_PROJECT_VENV"


def _bootstrap() -> None:
    if all(importlib.util.find_spec(name) is not None for name in REQUIRED):
        return
    if os.environ.get(REEXEC):
        sys.exit(f"pricehub: {sys.prefix} still lacks a dependency; remove .venv/ and retry")
    spec = importlib.util.spec_from_file_location("_pricehub_venv", HERE / "scripts" / "venv.py")
    assert spec is not None and spec.loader is not None
    venv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(venv)
    status = 0
    try:
        python = venv.ensure_venv("run")
    except venv.VenvError as exc:
        print(f"pricehub: {exc}", file=sys.stderr)
        status = 1
    except venv.subprocess.CalledProcessError as exc:
        print(f"pricehub: installing dependencies failed (exit {exc.returncode})", file=sys.stderr)
        status = 1
    if status:
        sys.exit(status)
    os.environ[REEXEC] = "1"
    os.execv(str(python), [str(python), str(HERE / "run_server.py"), *sys.argv[1:]])


if __name__ == "__main__":
    _bootstrap()
    sys.path.insert(0, str(HERE))
    from pricehub.cli import main

    sys.exit(main())
