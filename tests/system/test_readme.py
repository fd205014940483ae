"""The README's examples run as written: every shell block marked for it runs, top to
bottom, against a real `make run` and the example downstream, and each request answers
what the README says.

A request may answer 4xx only where its line's comment names that status; none may
answer 5xx.
"""

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..processes import ROOT, free_port, wait_for_http

pytestmark = pytest.mark.slow

MARKER = "<!-- tests/system/test_readme.py runs this block against make run -->"
STATUS_LINE = re.compile(r"^README-STATUS (\d+) (\d{3})$", re.M)
# Every curl of a block goes through this: its answer's status, and the line of the
# block it was called from, are written to stderr for the test to read.
PRELUDE = """set -eo pipefail
curl() { command curl -sS -w "%{stderr}README-STATUS ${BASH_LINENO[0]} %{http_code}\\n" "$@"; }
"""


@dataclass(frozen=True)
class Block:
    first_line: int  # the README's line of the block's first command
    lines: list[str]

    def command_at(self, line: int) -> str:
        """The whole command (its continuation lines too) around a line of the block."""
        start = end = line - self.first_line
        while start > 0 and self.lines[start - 1].endswith("\\"):
            start -= 1
        while end < len(self.lines) - 1 and self.lines[end].endswith("\\"):
            end += 1
        return "\n".join(self.lines[start : end + 1])


def marked_blocks(readme: str) -> list[Block]:
    lines = readme.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert lines[number + 1] == "```sh", f"README line {number + 2}: a sh block must follow"
        end = lines.index("```", number + 2)
        blocks.append(Block(number + 3, lines[number + 2 : end]))
    return blocks


def run_block(block: Block, env: dict) -> tuple[subprocess.CompletedProcess, list]:
    script = PRELUDE + "\n".join(block.lines) + "\n"
    offset = PRELUDE.count("\n")
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    answers = [
        (block.first_line + int(line) - offset - 1, int(status))
        for line, status in STATUS_LINE.findall(done.stderr)
    ]
    return done, answers


def unexpected(block: Block, answers: list[tuple[int, int]]) -> list[str]:
    """The answers the README does not announce: any 5xx, and a 4xx its comment does
    not name."""
    found = []
    for line, status in answers:
        command = block.command_at(line)
        if status >= 500 or (status >= 400 and str(status) not in command):
            found.append(f"README line {line}: {status} from {command!r}")
    return found


@pytest.fixture
def stack(tmp_path):
    """`make run` on embedded servers, and the example downstream, both on free ports."""
    port, downstream_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    # Slots open only 30 s ahead: nothing the examples submit runs while they read and
    # change it, as when a person types them.
    env.update(VAR_DIR=str(tmp_path), PORT=str(port), PLAN_LEAD_SECONDS="30")
    calls = (tmp_path / "downstream.log").open("w")  # a file: a pipe nobody reads fills
    downstream = subprocess.Popen(
        [sys.executable, "-m", "examples.downstream", "--port", str(downstream_port)],
        cwd=ROOT,
        stdout=calls,
    )
    make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", make, 180)
        env.update(
            API=f"http://127.0.0.1:{port}",
            DOWNSTREAM=f"http://127.0.0.1:{downstream_port}",
            PATH=f"{ROOT / '.venv' / 'bin'}:{env['PATH']}",
        )
        yield env
    finally:
        make.send_signal(signal.SIGTERM)
        make.wait(60)
        downstream.terminate()
        downstream.wait(10)
        calls.close()


def test_the_readme_blocks_run_as_written_and_answer_what_it_says(stack):
    blocks = marked_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 6
    outputs = []
    for block in blocks:
        done, answers = run_block(block, stack)
        assert done.returncode == 0, (
            f"the block at README line {block.first_line} failed:\n{done.stderr[-3000:]}"
        )
        assert unexpected(block, answers) == []
        outputs.append((block, done.stdout, answers))
    every = [status for _, _, answers in outputs for _, status in answers]
    assert every.count(202) >= 5  # the tasks submitted
    assert 304 in every  # the ETag read back
    printed = "\n".join(stdout for _, stdout, _ in outputs)
    assert "Task added to queue" in printed
    assert "Idempotent-Replayed: true" in printed
    assert re.search(r"^crm\s+30\s+30\s+workers\.processors:http_request\s+no", printed, re.M)


def test_a_status_the_readme_does_not_announce_is_found(tmp_path):
    # The checker itself: a 4xx is allowed only where the command's comment names it.
    block = Block(10, ["curl -X DELETE $API/x/  # else 409", "curl $API/y/ \\", "  -d 1"])
    assert unexpected(block, [(10, 409), (11, 200)]) == []
    assert unexpected(block, [(12, 404)]) == [
        "README line 12: 404 from 'curl $API/y/ \\\\\\n  -d 1'"
    ]
    assert unexpected(block, [(10, 500)]) != []


def test_every_marked_block_is_a_shell_block():
    assert marked_blocks(Path(ROOT / "README.md").read_text())
