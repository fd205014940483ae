"""Settings every process shares: recorded once, read by all, changed for all."""

import os
import subprocess
import sys

from sqlalchemy import text

from service.core.extensions import db
from service.planning.windows import plan_stored_task

from ..helpers import submit
from ..processes import ROOT
from ..processes import run_flask as flask


def test_the_first_process_records_and_a_disagreeing_one_refuses_to_start(app):
    assert flask("worker", "--burst", RPM=5).returncode == 0
    refused = flask("worker", "--burst", RPM=7)
    assert refused.returncode != 0
    assert "RPM=7" in refused.stderr and "RPM=5" in refused.stderr
    assert "flask settings set RPM=7" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert flask("scheduler", "--burst", RPM=7).returncode != 0


def test_a_process_that_sets_nothing_runs_by_the_deployments_values(app, runner):
    assert runner.invoke(args=["settings", "set", "RPM=3"]).exit_code == 0
    with app.app_context():
        task_id = submit(range(1, 8))
    # A worker with only the two URLs in its environment plans the task.
    assert flask("worker", "--burst", "--queue", "planning").returncode == 0
    with app.app_context():
        loads = (
            db.session.execute(text("SELECT load FROM slots ORDER BY slot_start")).scalars().all()
        )
        assert (
            db.session.execute(
                text("SELECT planned FROM id_tasks WHERE id = :t"), {"t": task_id}
            ).scalar()
            == 7
        )
    assert (max(loads), sum(loads)) == (3, 7)  # RPM 3, not the worker's default of 120


def test_rpm_changes_at_any_time_and_applies_to_planning_from_then_on(make_app):
    app = make_app(RPM=5)
    runner = app.test_cli_runner()
    with app.app_context():
        plan_stored_task(submit(range(1, 4)))
        result = runner.invoke(args=["settings", "set", "RPM=1"])
        assert result.exit_code == 0, result.output
        assert "RPM=1" in result.output
        later = submit([50, 51])
        plan_stored_task(later)
        slots = db.session.execute(
            text("SELECT count(DISTINCT slot_start) FROM assignments WHERE task_id = :t"),
            {"t": later},
        ).scalar()
    assert slots == 2  # one a slot, as RPM 1 allows


def test_slot_length_changes_only_while_no_id_waits(app, runner):
    with app.app_context():
        task_id = submit([1, 2])
        plan_stored_task(task_id)
    refused = runner.invoke(args=["settings", "set", "SLOT_SECONDS=30"])
    assert refused.exit_code != 0
    assert "only while no ID is waiting" in refused.output
    assert f"Task {task_id} still waits to run" in refused.output  # which task holds it up
    app.test_client().delete(f"/celery_ids_tasks/{task_id}/")
    changed = runner.invoke(args=["settings", "set", "SLOT_SECONDS=30", "WINDOW_SLOTS=6"])
    assert changed.exit_code == 0, changed.output
    assert "SPREAD_MIN_OPEN_SLOTS=3" in changed.output  # half the new window
    assert runner.invoke(args=["settings", "set", "SPREAD_MIN_OPEN_SLOTS=9"]).exit_code != 0
    assert runner.invoke(args=["settings", "set", "NOPE=1"]).exit_code != 0
    shown = runner.invoke(args=["settings", "show"]).output
    assert "SLOT_SECONDS=30" in shown and "WINDOW_SLOTS=6" in shown


def test_settings_from_the_environment_are_applied_for_all(app):
    applied = flask("settings", "set", "--from-env", RPM=9, MAX_ATTEMPTS=4)
    assert applied.returncode == 0, applied.stderr
    assert "RPM=9" in applied.stdout and "MAX_ATTEMPTS=4" in applied.stdout
    assert flask("worker", "--burst", RPM=9).returncode == 0


def test_the_web_refuses_to_start_with_other_settings(app):
    assert flask("settings", "set", "RPM=5").returncode == 0
    env = {**os.environ, "RPM": "6"}
    web = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0", "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert web.returncode != 0
    assert "RPM=6" in web.stderr and "flask settings set" in web.stderr
