#!/usr/bin/env bash
# Regenerate the committed lock requirements/{run,test,bench}.txt from setup.cfg's ranges
# (+ requirements/build.in): every direct and transitive dependency pinned with hashes, for
# Python 3.11+ on every platform (uv's universal resolution). Upgrading a dependency is this
# command, a green scripts/test.sh, and one commit of the changed lock.
# uv runs from a throwaway tool venv; nothing of it is needed to install from the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${PRICEHUB_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/pricehub-lock-tools}
[ -x "$tools/bin/uv" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q uv; }
compile() {
  "$tools/bin/uv" pip compile setup.cfg requirements/build.in "${@:2}" --universal \
    --python-version 3.11 --generate-hashes --no-header -q -o "requirements/$1.txt"
}
compile run
compile test --extra test
compile bench --extra test --extra bench
echo "lock written: requirements/{run,test,bench}.txt"
