"""Every ```python block of README.md and docs/*.md runs as written, against a live server.

The rules (issue 22.7), for whoever writes an example:

* A block is run when its fence's info string is ``python`` (or ``py``, ``python3``); shell,
  text, HTML and unlabelled blocks are not.
* A block that cannot run on its own (a fragment) says so right above its fence, blank lines
  allowed in between: ``<!-- not-run: why -->``. The reason is required; keep these rare.
* Each block runs as its own script (``python block.py``, in a fresh temporary directory, with
  this checkout first on ``PYTHONPATH``) against one real pricehub started by this module:
  ``run_server.py`` on a free port, without Redis (``--redis-url none``), its journal
  (``--data-dir``) in a temporary directory, the simulator on with 0.1 s ticks (so a
  consumer sees prices at once) and the publish key ``change-me`` of the README's examples.
* Examples talk to the documented default address: every ``127.0.0.1:8080`` and
  ``localhost:8080`` in a block is rewritten to ``127.0.0.1:<that port>``. Other addresses are
  left alone (``127.0.0.1:1``, where nothing listens, stands for a server that is down).
* A block passes when it exits 0 within ``BLOCK_TIMEOUT`` seconds. A consumer that streams
  until interrupted, like the Python client's quick start, says so right above its fence:
  ``<!-- streams: until Ctrl-C -->``. It gets SIGINT (a reader's Ctrl-C) once it has printed
  ``STREAM_LINES`` lines, and passes when its stderr then holds nothing but the
  ``KeyboardInterrupt`` traceback (no other error, warning or log line). Only marked blocks
  are interrupted: a Ctrl-C racing a block's own end has no one outcome (a traceback, a
  silent death in finalization, asyncio's "Task was destroyed"), so a bounded block must end
  by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.serverproc import REPO, ServerProcess

BLOCK_TIMEOUT = 30.0
STREAM_LINES = 10
PUBLISH_KEY = "change-me"  # the README's example key
DOCUMENTED_ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost):8080\b")
RUN_LANGUAGES = frozenset({"python", "py", "python3"})
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
NOT_RUN = re.compile(r"<!--\s*not-run\b:?\s*(?P<reason>.*?)\s*-->")
STREAMS = re.compile(r"<!--\s*streams\b:?\s*(?P<reason>.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None  # the marker's reason; "" for a marker without one
    streams: bool = False  # runs until interrupted (a ``streams`` marker above it)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, with the ``not-run`` marker above each."""
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip()
                for line in lines[index + 1 : end]]  # fmt: skip
        yield Block(path, index + 1, opening["info"].lower(), "\n".join(body) + "\n",
                    _marker_above(lines, index, NOT_RUN),
                    _marker_above(lines, index, STREAMS) is not None)  # fmt: skip
        index = end + 1


def _marker_above(lines: list[str], fence_index: int, kind: re.Pattern[str]) -> str | None:
    above = fence_index - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    marker = kind.search(lines[above]) if above >= 0 else None
    return None if marker is None else marker["reason"]


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks() -> list[Block]:
    return [block for path in documents() for block in code_blocks(path)
            if block.language in RUN_LANGUAGES]  # fmt: skip


def example_params() -> list[object]:
    return [
        pytest.param(block, id=block.name, marks=[pytest.mark.skip(reason=block.not_run)])
        if block.not_run else pytest.param(block, id=block.name)
        for block in python_blocks()
    ]  # fmt: skip


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir = tmp_path_factory.mktemp("docs-data")
    with ServerProcess(
        "--simulate", "--simulate-interval", "0.1", publish_key=PUBLISH_KEY, data_dir=data_dir
    ) as proc:
        yield proc


async def _read_lines(stream: asyncio.StreamReader, into: list[str], limit: int | None) -> None:
    """Collect ``stream``'s lines until its end, or until ``limit`` lines were read."""
    while limit is None or len(into) < limit:
        line = await stream.readline()
        if not line:
            return
        into.append(line.decode(errors="replace"))


async def run_example(block: Block, server: ServerProcess, workdir: Path) -> None:
    script = workdir / "block.py"
    script.write_text(DOCUMENTED_ADDRESS.sub(f"127.0.0.1:{server.port}", block.code))
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=workdir, env=_env(), preexec_fn=_sigint_by_default,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    out: list[str] = []
    err: list[str] = []
    errors = asyncio.create_task(_read_lines(process.stderr, err, None))
    interrupted, code = False, None
    try:
        async with asyncio.timeout(BLOCK_TIMEOUT):
            await _read_lines(process.stdout, out, STREAM_LINES if block.streams else None)
            if block.streams and len(out) == STREAM_LINES:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                interrupted = True
            await _read_lines(process.stdout, out, None)
            code = await process.wait()
            await errors
    except TimeoutError:
        pass  # reported below, with what the block printed
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        errors.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await errors
    report = f"{block.name} (exit {code}):\n--- stdout\n{''.join(out)}--- stderr\n{''.join(err)}"
    assert code is not None, f"still running after {BLOCK_TIMEOUT} s: {report}"
    if code == 0:
        return
    assert interrupted, report
    # Nothing but the interrupt's own traceback (asyncio.run chains the main task's
    # CancelledError to it): another error, a warning or a log line would show here.
    assert err[:1] == ["Traceback (most recent call last):\n"], report
    raised = _raised(err)
    assert "KeyboardInterrupt" in raised, report
    assert raised <= {"asyncio.exceptions.CancelledError", "KeyboardInterrupt"}, report


def _sigint_by_default() -> None:
    """In the child before exec: SIGINT to its default, as a terminal gives it. A suite run
    as a background job inherits SIGINT ignored, and Python then raises no KeyboardInterrupt
    in the block: the streaming rule's Ctrl-C would go unheard."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _raised(traceback: list[str]) -> set[str]:
    """The exception lines of a (chained) traceback: those not indented and not a header."""
    headers = ("Traceback (most recent call last):", "During handling of the above exception")
    return {line.strip() for line in traceback
            if line.strip() and not line[0].isspace() and not line.startswith(headers)}  # fmt: skip


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("block", example_params())
async def test_python_example_runs(
    block: Block, docs_server: ServerProcess, tmp_path: Path
) -> None:
    await run_example(block, docs_server, tmp_path)


def test_every_not_run_marker_gives_a_reason() -> None:
    unexplained = [block.name for path in documents() for block in code_blocks(path)
                   if block.not_run == ""]  # fmt: skip
    assert not unexplained, f"<!-- not-run: ... --> without a reason above {unexplained}"


def test_the_extractor_reads_fences_markers_and_indented_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nprint(1)\n```\n\n"
        "<!-- not-run: a fragment of the one above -->\n\n```py\nx = 1\n```\n\n"
        "````text\n```python\nnot a block of its own\n```\n````\n\n"
        "1. a list item:\n\n   ```python\n   if True:\n       print(2)\n   ```\n\n"
        "<!-- streams: until Ctrl-C -->\n```python\nwhile True: pass\n```\n"
    )
    blocks = list(code_blocks(page))
    assert [(b.line, b.language, b.not_run, b.streams) for b in blocks] == [
        (3, "python", None, False),
        (9, "py", "a fragment of the one above", False),
        (13, "text", None, False),
        (21, "python", None, False),
        (27, "python", None, True),
    ]
    assert blocks[0].code == "print(1)\n"
    assert blocks[2].code == "```python\nnot a block of its own\n```\n"
    assert blocks[3].code == "if True:\n    print(2)\n"
