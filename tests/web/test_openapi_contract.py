"""The API against its own OpenAPI document, fuzzed by schemathesis with its checks on.

Every check runs but one: `use_after_free` expects a DELETEd resource to be gone, while a
DELETE here cancels a task, which stays readable with the status `cancelled` (see
docs/api.md). The seed is fixed so that a run in `make test` is repeatable; `st run` with
the same options and no seed explores further by hand. tests/schemathesis_hooks.py gives
each request a fresh Idempotency-Key, as a client would.
"""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from ..processes import ROOT

pytestmark = pytest.mark.slow

SEED = "20261130"
EXAMPLES_PER_OPERATION = "100"


TOKEN = "fuzz-token-0123456789"


@pytest.fixture
def served(make_app):
    # With a token: the checks then also find any operation that answers without it.
    server = make_server("127.0.0.1", 0, make_app(API_TOKEN=TOKEN), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def test_every_answer_keeps_to_the_openapi_document(served, tmp_path):
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{served}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        "all",
        "--exclude-checks",
        "use_after_free",
        "--mode",
        "all",
        "--max-examples",
        EXAMPLES_PER_OPERATION,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    assert shutil.which(command[0]), "schemathesis is installed with requirements-dev.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"}
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    # Kept beside the JUnit report: what ran, how many cases, which checks.
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "Tested: " in run.stdout
