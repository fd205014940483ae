"""The operator commands, run through Flask's CLI runner."""

import subprocess
import sys
from datetime import UTC, datetime

import pytest
from rq import Queue
from rq.job import Job
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.jobs import PLANNING_QUEUE
from service.limits import store as limits
from service.planning.windows import plan_stored_task
from service.tasks.ids import BELOW_ONE, NOT_A_NUMBER

from ..helpers import PAST, add_limit, slots_by_id, submit
from ..processes import ROOT


def test_worker_burst_runs_the_queued_planning_job(app, client, runner):
    task_id = client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1]}).json["id"]
    result = runner.invoke(args=["worker", "--burst", "--queue", PLANNING_QUEUE])
    assert result.exit_code == 0, result.output
    with app.app_context():
        job = Job.fetch(f"plan-{task_id}", connection=get_redis())
        assert job.is_finished
        assert Queue(PLANNING_QUEUE, connection=get_redis()).count == 0
    task = client.get(f"/celery_ids_tasks/{task_id}/").json
    assert (task["status"], task["planned"]) == ("scheduled", 1)
    assert client.get(f"/celery_ids_tasks/{task_id}/ids/").json[0]["slot"] == task["first_slot"]


def test_plan_show_prints_the_window_as_a_grid_with_rpm_marked(make_app):
    from service.tasks.services import submit_task

    app = make_app(RPM=2)
    with app.app_context():
        task = submit_task("t", range(1001, 1036))
        plan_stored_task(task.id, now=datetime(2030, 1, 7, 9, 59, 50, tzinfo=UTC))
    result = app.test_cli_runner().invoke(args=["plan", "show", "--at", "2030-01-07 10:00:00"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("window 10:00-10:15 UTC: 35 IDs planned, capacity 30 (RPM 2)")
    assert lines[1].split() == [f"10:{m:02d}" for m in range(15)]
    assert lines[2].split()[:3] == ["1001", "1003", "1005"]
    assert lines[3].split()[:3] == ["1002", "1004", "1006"]
    assert "RPM 2" in lines[4] and set(lines[4].split()[0]) == {"-"}
    assert lines[5].split() == [str(i) for i in range(1031, 1036)]
    assert lines[6].split() == ["3"] * 5 + ["2"] * 10 + ["load"]


def test_tasks_submit_streams_a_file_and_prints_the_task(app, runner, tmp_path):
    source = tmp_path / "ids.csv"
    source.write_text("\n".join(str(i) for i in range(1, 5001)) + "\n7\n")
    result = runner.invoke(args=["tasks", "submit", str(source), "--name", "from file"])
    assert result.exit_code == 0, result.output
    assert "5000 IDs (1 duplicates dropped), queued for planning" in result.output
    with app.app_context():
        assert Queue(PLANNING_QUEUE, connection=get_redis()).count == 1


def test_tasks_submit_refuses_a_file_with_bad_ids(app, runner, tmp_path):
    source = tmp_path / "ids.csv"
    source.write_text("1,2,three")
    result = runner.invoke(args=["tasks", "submit", str(source), "--name", "bad"])
    assert result.exit_code == 1
    assert "'three'" in result.output
    with app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM id_tasks")).scalar() == 0


def test_tasks_submit_names_each_bad_id_by_line_and_column_as_the_api_does(app, runner, tmp_path):
    source = tmp_path / "ids.csv"
    source.write_text("1,2,3\n4,5a,6\n" + "\n".join(f"-{n}" for n in range(1, 31)))
    result = runner.invoke(args=["tasks", "submit", str(source), "--name", "bad"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"line 2, column 3, '5a': {NOT_A_NUMBER}" in lines
    assert f"line 3, column 1, '-1': {BELOW_ONE}" in lines
    assert "and 11 more" in lines
    assert lines[-1] == "31 of the 36 IDs are invalid"


def test_tasks_submit_reads_standard_input(app, runner):
    ids = "\n".join(str(i) for i in range(1, 101))
    result = runner.invoke(args=["tasks", "submit", "-", "--name", "piped"], input=ids)
    assert result.exit_code == 0, result.output
    assert "100 IDs (0 duplicates dropped)" in result.output


def test_tasks_submit_takes_a_pipe_of_unknown_size(app):
    piped = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "tasks", "submit", "-", "--name", "p"],
        input="\n".join(str(i) for i in range(1, 2001)).encode(),
        capture_output=True,
        cwd=ROOT,
    )
    assert piped.returncode == 0, piped.stderr.decode()[-2000:]
    assert b"2000 IDs (0 duplicates dropped)" in piped.stdout


def test_limits_are_created_listed_paused_and_resumed(app, runner):
    created = runner.invoke(
        args=[
            "limits",
            "create",
            "partner-api",
            "--rpm",
            "30",
            "--processor",
            "workers.processors:http_request",
            "--option",
            "url=https://partner.example/v1/users/{id}/sync",
            "--option",
            "timeout=5",
            "--max-refusals",
            "12",
        ]
    )
    assert created.exit_code == 0, created.output
    assert "limit partner-api: rpm 30" in created.output
    with app.app_context():
        partner = limits.find("partner-api")
        assert (partner.options["timeout"], partner.max_refusals, partner.adaptive) == (
            5.0,
            12,
            True,
        )
    assert runner.invoke(args=["limits", "pause", "partner-api"]).exit_code == 0
    listed = runner.invoke(args=["limits", "list"]).output.splitlines()
    assert [line.split() for line in listed] == [
        ["name", "rpm", "learned", "processor", "paused", "pending"],
        ["default", "120", "120", "workers.processors:record_user", "no", "0"],
        ["partner-api", "30", "30", "workers.processors:http_request", "yes", "0"],
    ]
    resumed = runner.invoke(args=["limits", "resume", "partner-api"])
    assert resumed.exit_code == 0, resumed.output
    assert "0 IDs whose slot had passed planned again" in resumed.output
    with app.app_context():
        assert limits.find("partner-api").paused is False


def test_a_resume_from_the_command_line_plans_the_overdue_ids_again(app, runner):
    with app.app_context():
        add_limit("partner", 3)
        plan_stored_task(submit([1, 2, 3, 4], limit="partner"), now=PAST)
    runner.invoke(args=["limits", "pause", "partner"])
    resumed = runner.invoke(args=["limits", "resume", "partner"])
    assert "4 IDs whose slot had passed planned again" in resumed.output
    with app.app_context():
        assert min(slots_by_id(1).values()) > datetime.now(UTC)


@pytest.mark.parametrize(
    "args,message",
    [
        (["pause", "nowhere"], "limit 'nowhere' does not exist"),
        (["resume", "Not A Slug"], "limit 'Not A Slug' does not exist"),
        (["create", "Not A Slug", "--rpm", "3"], "name: "),
        (["create", "x", "--rpm", "0"], "rpm: Must be greater than or equal to 1"),
        (
            ["create", "x", "--rpm", "3", "--processor", "nowhere:f"],
            "processor: its module must be one of PROCESSOR_MODULES",
        ),
        (
            ["create", "x", "--rpm", "3", "--processor", "workers.processors:nope"],
            "processor: cannot be imported",
        ),
        (["create", "x", "--rpm", "3", "--option", "tag=a"], "options: the processor takes none"),
        (["create", "x", "--rpm", "3", "--option", "tag"], "'tag' is not KEY=VALUE"),
        (["create", "default", "--rpm", "3"], "a limit with this name already exists"),
        (
            ["create", "x", "--rpm", "3", "--processor", "workers.processors:http_request"],
            "options.url: Missing data for required field",
        ),
    ],
)
def test_a_refused_limits_command_says_why_in_one_line(app, runner, args, message):
    runner.invoke(args=["limits", "list"])  # the default limit exists
    result = runner.invoke(args=["limits", *args])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)  # no traceback
    last = result.output.splitlines()[-1]  # a usage mistake shows the usage above it
    assert last.startswith("Error: ") and message in last
    with app.app_context():
        assert limits.all_names() == ["default"]
