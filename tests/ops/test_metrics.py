"""/metrics: requests by route and status, and the plan's figures read at scrape time."""

from datetime import UTC, datetime, timedelta

from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.reading import slot_grid
from service.planning.windows import plan_stored_task

from ..helpers import parse_metrics, requests_counted, set_load, slots_by_id, submit
from ..processes import run_python

STATUSES = ("pending", "running", "retrying", "done", "failed")


def scrape(client) -> dict[tuple, float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain; version=0.0.4")
    return parse_metrics(answer.get_data(as_text=True))


def gauge(figures, name, **labels) -> float:
    return figures[(name, tuple(sorted(labels.items())))]


def test_requests_are_counted_by_route_and_status(client):
    before = scrape(client)
    client.get("/users/")
    client.get("/users/")
    client.get("/users/12345/")
    client.get("/no/such/path")
    client.open("/users/", method="BREW")
    after = scrape(client)

    def counted(method, route, status):
        return requests_counted(after, method, route, status) - requests_counted(
            before, method, route, status
        )

    assert counted("GET", "/users/", 200) == 2
    assert counted("GET", "/users/<id:user_id>/", 404) == 1
    assert counted("GET", "unmatched", 404) == 1
    assert counted("other", "unmatched", 405) == 1
    assert counted("GET", "/metrics", 200) == 1  # the first scrape
    latency = (
        "slotted_http_request_duration_seconds_count",
        (("method", "GET"), ("route", "/users/")),
    )
    assert after[latency] - before.get(latency, 0.0) == 2


def test_the_plan_figures_after_a_task_ran(rpm3):
    now = datetime.now(UTC)
    # 7 IDs at RPM 3 planned 20 minutes ago: three slots long past, queued at once; the
    # first one runs now, about 19 minutes late.
    earlier = submit(range(1, 8))
    plan_stored_task(earlier, now=now - timedelta(minutes=20))
    first = min(slots_by_id(earlier).values())
    assert run_slot(DEFAULT, first).done == 3
    # 4 IDs in two slots ten minutes ahead: their jobs wait in rq-scheduler.
    later = submit(range(101, 105))
    plan_stored_task(later, now=now + timedelta(minutes=10))

    figures = scrape(rpm3.test_client())

    ids = {status: gauge(figures, "slotted_ids", status=status) for status in STATUSES}
    assert ids == {"pending": 8, "running": 0, "retrying": 0, "done": 3, "failed": 0}
    assert gauge(figures, "slotted_late_slots") == 1
    lateness = {
        le: gauge(figures, "slotted_slot_start_lateness_seconds_bucket", le=le)
        for le in ("60.0", "300.0", "+Inf")
    }
    assert lateness == {"60.0": 0, "300.0": 0, "+Inf": 1}
    assert 900 < gauge(figures, "slotted_slot_start_lateness_seconds_gsum") < 1500
    assert gauge(figures, "slotted_rq_queue_jobs", queue="slots") == 3
    assert gauge(figures, "slotted_rq_queue_jobs", queue="planning") == 2  # one per submit
    assert gauge(figures, "slotted_scheduled_slot_jobs") == 2
    assert gauge(figures, "slotted_source_up", source="postgresql") == 1
    assert gauge(figures, "slotted_source_up", source="redis") == 1


def test_the_current_windows_load_against_its_capacity(rpm3):
    grid = slot_grid()
    window = grid.window_of(datetime.now(UTC))
    # This window and the next hold 2 IDs a slot, so that the figure is the same should
    # the scrape fall after the window turns.
    for start in (window, grid.next_window(window)):
        for slot in grid.slots_of_window(start):
            set_load(slot, 2)
    figures = scrape(rpm3.test_client())
    assert gauge(figures, "slotted_window_load") == 2 * grid.window_slots
    assert gauge(figures, "slotted_window_capacity") == 3 * grid.window_slots


def test_a_source_that_does_not_answer_is_reported_and_the_rest_still_served(make_app):
    figures = scrape(make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client())
    assert gauge(figures, "slotted_source_up", source="redis") == 0
    assert gauge(figures, "slotted_source_up", source="postgresql") == 1
    assert gauge(figures, "slotted_ids", status="pending") == 0
    assert not any(name == "slotted_rq_queue_jobs" for name, _ in figures)


def test_metrics_need_the_token(make_app):
    guarded = make_app(API_TOKEN="s3cret-0123456789").test_client()
    assert guarded.get("/metrics").status_code == 401
    assert (
        guarded.get("/metrics", headers={"Authorization": "Bearer s3cret-0123456789"}).status_code
        == 200
    )


def test_processes_add_up_their_counts_in_multiprocess_mode(app, tmp_path):
    def in_a_process(code: str) -> str:
        script = f"from service import create_app\nclient = create_app().test_client()\n{code}"
        return run_python(["-c", script], {"PROMETHEUS_MULTIPROC_DIR": tmp_path}).stdout

    in_a_process("for _ in range(2): client.get('/healthz')")
    in_a_process("for _ in range(3): client.get('/healthz')")
    figures = parse_metrics(in_a_process("print(client.get('/metrics').get_data(as_text=True))"))
    assert requests_counted(figures, "GET", "/healthz", 200) == 5
