#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them.
#   - system packages (redis-server, chromium, prometheus's promtool, node) when missing,
#     with apt-get when running as root;
#   - the project's venv .venv/ from the committed lock requirements/test.txt (every
#     dependency pinned and hash-checked; nothing is installed into the system Python),
#     with pricehub itself editable;
#   - then lint (ruff), types (mypy --strict), the JS unit tests and pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k resume).
# PRICEHUB_DEPS=latest runs the same against the newest releases setup.cfg allows, in
# .venv-latest/ (scripts/test-latest.sh): how an upgrade is tried before the lock moves.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v promtool >/dev/null || missing+=(prometheus)
command -v node >/dev/null || missing+=(nodejs)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: missing ${missing[*]}; their tests fail under CI=true, skip otherwise" >&2
  fi
fi

PYTHON=$(python3 scripts/venv.py "${PRICEHUB_DEPS:-test}")
"$PYTHON" -m ruff check pricehub tests bench scripts run_server.py
"$PYTHON" -m mypy
node --test tests/js/
exec "$PYTHON" -m pytest "$@"
