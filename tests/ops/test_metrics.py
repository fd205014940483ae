"""/metrics: requests by route and status, and the plan's figures read at scrape time."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from service.core.extensions import db
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.reading import slot_grid
from service.planning.windows import plan_stored_task

from ..helpers import (
    add_limit,
    parse_metrics,
    requests_counted,
    set_load,
    slots_by_id,
    submit,
)
from ..processes import run_python

STATUSES = ("pending", "running", "retrying", "done", "failed")


def scrape(client) -> dict[tuple, float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.content_type.startswith("text/plain; version=0.0.4")
    return parse_metrics(answer.get_data(as_text=True))


def gauge(figures, name, **labels) -> float:
    return figures[(name, tuple(sorted(labels.items())))]


def per_limit(figures, name, **labels) -> dict[str, float]:
    """A figure's value for each limit that has a series of it."""
    return {
        dict(key)["limit"]: value
        for (found, key), value in figures.items()
        if found == name and set(labels.items()) <= set(key)
    }


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

    ids = {
        status: gauge(figures, "slotted_ids", limit=DEFAULT, status=status) for status in STATUSES
    }
    assert ids == {"pending": 8, "running": 0, "retrying": 0, "done": 3, "failed": 0}
    assert gauge(figures, "slotted_late_slots", limit=DEFAULT) == 1
    lateness = {
        le: gauge(figures, "slotted_slot_start_lateness_seconds_bucket", limit=DEFAULT, le=le)
        for le in ("60.0", "300.0", "+Inf")
    }
    assert lateness == {"60.0": 0, "300.0": 0, "+Inf": 1}
    gsum = gauge(figures, "slotted_slot_start_lateness_seconds_gsum", limit=DEFAULT)
    assert 900 < gsum < 1500
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
    assert gauge(figures, "slotted_window_load", limit=DEFAULT) == 2 * grid.window_slots
    assert gauge(figures, "slotted_window_capacity", limit=DEFAULT) == 3 * grid.window_slots


def learn(limit: int, learned_rpm: int, refusals: int, moved: tuple[int, ...]) -> None:
    """A learned rate as refusals leave it, with one event per re-plan that moved IDs."""
    db.session.execute(
        text(
            "INSERT INTO learned_rates (limit_id, learned_rpm, learned_at, refusals) "
            "VALUES (:limit, :learned, now(), :refusals)"
        ),
        {"limit": limit, "learned": learned_rpm, "refusals": refusals},
    )
    for count in moved:
        db.session.execute(
            text(
                "INSERT INTO limit_events (limit_id, kind, reason, from_rpm, to_rpm, moved) "
                "VALUES (:limit, 'lowered', 'refused', 5, :learned, :moved)"
            ),
            {"limit": limit, "learned": learned_rpm, "moved": count},
        )
    db.session.commit()


def plan_into(window: datetime, ids, limit: str | None = None) -> None:
    """A task planned just before `window`, so that its IDs fill that window's slots."""
    plan_stored_task(submit(ids, limit=limit), now=window - timedelta(seconds=10))


def test_each_limit_has_a_series_of_every_plan_figure(rpm3):
    grid = slot_grid()
    learn(add_limit("partner", 5), learned_rpm=2, refusals=7, moved=(4, 6))
    window = grid.window_of(datetime.now(UTC))
    # This window and the next hold the same IDs of each limit, so that the figures are
    # the same should the scrape fall after the window turns.
    for start in (window, grid.next_window(window)):
        plan_into(start, range(1, 21))
        plan_into(start, range(1, 11), limit="partner")

    figures = scrape(rpm3.test_client())

    for status in STATUSES:
        expected = (
            {DEFAULT: 40, "partner": 20} if status == "pending" else {DEFAULT: 0, "partner": 0}
        )
        assert per_limit(figures, "slotted_ids", status=status) == expected
    assert per_limit(figures, "slotted_window_load") == {DEFAULT: 20, "partner": 10}
    # The partner's slots take its learned 2 a minute, not its RPM of 5.
    assert per_limit(figures, "slotted_window_capacity") == {
        DEFAULT: 3 * grid.window_slots,
        "partner": 2 * grid.window_slots,
    }
    assert per_limit(figures, "slotted_late_slots") == {DEFAULT: 0, "partner": 0}
    lateness = "slotted_slot_start_lateness_seconds_bucket"
    assert per_limit(figures, lateness, le="+Inf") == {DEFAULT: 0, "partner": 0}
    assert per_limit(figures, "slotted_limit_rpm") == {DEFAULT: 3, "partner": 5}
    assert per_limit(figures, "slotted_limit_learned_rpm") == {DEFAULT: 3, "partner": 2}
    assert per_limit(figures, "slotted_limit_adaptive") == {DEFAULT: 1, "partner": 1}
    assert per_limit(figures, "slotted_limit_refusals_total") == {DEFAULT: 0, "partner": 7}
    assert per_limit(figures, "slotted_limit_replans_total") == {DEFAULT: 0, "partner": 2}
    assert per_limit(figures, "slotted_limit_replanned_ids_total") == {DEFAULT: 0, "partner": 10}


def test_a_learned_rate_above_the_rpm_counts_as_the_rpm(rpm3):
    limit = add_limit("partner", 5)
    learn(limit, learned_rpm=9, refusals=1, moved=())
    db.session.execute(text("UPDATE limits SET adaptive = false WHERE id = :id"), {"id": limit})
    db.session.commit()
    figures = scrape(rpm3.test_client())
    assert gauge(figures, "slotted_limit_learned_rpm", limit="partner") == 5
    assert (
        gauge(figures, "slotted_window_capacity", limit="partner") == 5 * slot_grid().window_slots
    )
    assert gauge(figures, "slotted_limit_adaptive", limit="partner") == 0


def test_a_source_that_does_not_answer_is_reported_and_the_rest_still_served(make_app):
    figures = scrape(make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client())
    assert gauge(figures, "slotted_source_up", source="redis") == 0
    assert gauge(figures, "slotted_source_up", source="postgresql") == 1
    assert gauge(figures, "slotted_ids", limit=DEFAULT, status="pending") == 0
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
