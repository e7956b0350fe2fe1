#!/usr/bin/env python3
"""Start one pricehub instance: ``python run_server.py --help`` lists the flags.

On a fresh checkout this installs pricehub's dependencies first (into the running
Python), so the one command works on a machine with only Python 3.11+.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIRED = ("aiohttp", "redis", "orjson", "structlog", "prometheus_client", "jwt")

if any(importlib.util.find_spec(name) is None for name in REQUIRED):
    print("pricehub: installing dependencies (pip install -e .) ...", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", str(HERE)])

sys.path.insert(0, str(HERE))
from pricehub.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
