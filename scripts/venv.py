#!/usr/bin/env python3
"""The project's own virtual environment, made from the committed lock.

``python3 scripts/venv.py KIND`` makes (or reuses) a venv and prints its Python's path:

- ``run``, ``test``, ``bench``: ``.venv/`` with ``requirements/KIND.txt`` installed
  (``--require-hashes``: every direct and transitive dependency pinned and checked), then
  pricehub itself, editable, without resolving anything again;
- ``latest``: ``.venv-latest/`` with the newest releases that ``setup.cfg``'s ranges allow
  (``pip install --upgrade -e '.[test]'``), for trying an upgrade before locking it.

Only the standard library is used: this runs under the bare ``python3`` of a fresh
Debian/Ubuntu machine, whose own environment is "externally managed" (PEP 668) and must
never be installed into. A venv is reused while the lock it was made from is unchanged (a
stamp file holds the lock's hash); a changed lock reinstalls. Debian ships ``venv`` without
``ensurepip`` unless ``python3-venv`` is installed: as root, that package is installed with
apt-get; otherwise the one line that says what to install.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["ensure_venv", "main"]

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ("run", "test", "bench")
# The stamp is written only after every install step succeeded, so an interrupted install
# (Ctrl-C, a lost network) is redone from the start by the next call instead of trusted.
STAMP = ".pricehub-lock"
PIP = ("-m", "pip", "--disable-pip-version-check", "-q")


class VenvError(Exception):
    """A venv could not be made: the message is the one line to show."""


def _say(message: str) -> None:
    print(f"pricehub: {message}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _has_ensurepip() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    return probe.returncode == 0


def _install_python3_venv() -> None:
    """Debian/Ubuntu split ``ensurepip`` into ``python3-venv``: install it as root."""
    if _has_ensurepip():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise VenvError(
            "this Python cannot make a venv (no ensurepip): install python3-venv "
            "(sudo apt-get install python3-venv) and run the command again"
        )
    _say("installing python3-venv with apt-get (needed to make the project's venv)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    version = f"python3.{sys.version_info.minor}-venv"
    packages = ["python3-venv", version]
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def _create(venv: Path) -> None:
    _install_python3_venv()
    if venv.exists():
        shutil.rmtree(venv)  # a half-made or foreign venv: start clean
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)


def _lock_hash(kind: str) -> str:
    digest = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml", f"requirements/{kind}.txt"):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return f"{kind} {digest.hexdigest()}"


def _install_locked(python: Path, kind: str) -> None:
    lock = ROOT / "requirements" / f"{kind}.txt"
    pip = [str(python), *PIP]
    subprocess.run([*pip, "install", "--require-hashes", "-r", str(lock)], check=True)
    # Every dependency, setuptools and wheel included, came from the lock: the editable
    # install must not resolve or download anything more, hence no deps and no isolation.
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _install_latest(python: Path) -> None:
    pip = [str(python), *PIP]
    subprocess.run([*pip, "install", "--upgrade", "pip", "setuptools", "wheel"], check=True)
    subprocess.run([*pip, "install", "--upgrade", "-e", f"{ROOT}[test]"], check=True)


# The test lock holds everything of the run lock, the bench lock everything of the test
# lock: a venv made for a larger lock serves a smaller one without reinstalling.
COVERING = {"run": ("run", "test", "bench"), "test": ("test", "bench"), "bench": ("bench",)}


def ensure_venv(kind: str) -> Path:
    """Make or reuse the venv for ``kind`` and return its Python."""
    latest = kind == "latest"
    venv = ROOT / (".venv-latest" if latest else ".venv")
    python = _venv_python(venv)
    stamp = venv / STAMP
    have = stamp.read_text() if stamp.is_file() else ""
    if not latest and python.exists() and have in {_lock_hash(k) for k in COVERING[kind]}:
        return python
    if not python.exists():
        _say(f"making the project's venv in {venv.name}/ (once)")
        _create(venv)
    stamp.unlink(missing_ok=True)
    if latest:
        _say("installing the newest releases setup.cfg allows (not the lock)")
        _install_latest(python)  # "latest" means newest now, every time
        stamp.write_text("latest")
    else:
        _say(f"installing requirements/{kind}.txt into {venv.name}/")
        _install_locked(python, kind)
        stamp.write_text(_lock_hash(kind))
    return python


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*LOCKS, "latest"):
        _say(f"usage: python3 scripts/venv.py {{{','.join((*LOCKS, 'latest'))}}}")
        return 2
    try:
        python = ensure_venv(argv[0])
    except VenvError as exc:
        _say(str(exc))
        return 1
    except subprocess.CalledProcessError as exc:
        _say(f"installing failed ({' '.join(map(str, exc.cmd[:4]))} ... exit {exc.returncode})")
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
