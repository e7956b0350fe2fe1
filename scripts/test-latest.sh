#!/usr/bin/env bash
# The suite against the newest releases of every dependency that setup.cfg's ranges allow,
# in .venv-latest/ (the lock and .venv/ are left alone). Not run by CI: it is how an
# upgrade is tried; a green run is followed by a deliberate commit that updates the lock
# (scripts/lock.sh). Arguments go to pytest, as with scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PRICEHUB_DEPS=latest exec bash scripts/test.sh "$@"
