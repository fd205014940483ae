import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_is_valid_and_has_every_part():
    parsed = subprocess.run(
        ["docker-compose", "config", "--services"], cwd=ROOT, capture_output=True, text=True
    )
    assert parsed.returncode == 0, parsed.stderr
    assert set(parsed.stdout.split()) == {
        "postgres",
        "redis",
        "migrate",
        "web",
        "worker",
        "scheduler",
    }
