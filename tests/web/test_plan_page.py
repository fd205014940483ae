"""The plan pages: two hours of slots as windows of cells with the tasks planned into
them and the latest failures, each slot's IDs and each task on a page of its own, every
limit at a glance, the slot jobs that rq-scheduler holds, errors as pages."""

import html
import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

from service.dispatch.claimers import new_claimer_id
from service.dispatch.claims import claim
from service.dispatch.outcomes import record_outcomes
from service.dispatch.slot_runs import run_slot
from service.jobs import slot_job_id
from service.limits.store import DEFAULT, SlotOfLimit
from service.planning.resume import pause
from service.planning.windows import plan_stored_task
from service.processors.contract import Failure
from service.web.plan_overview import current_plan, limits_overview

from ..helpers import FIRST_SLOT, PAST, add_limit, at, limit_id, set_load, submit


class Cells(HTMLParser):
    """The cells of a page as {slot: set of classes}, their links, and the window labels."""

    def __init__(self, html: str):
        super().__init__()
        self.classes, self.links, self.labels = {}, {}, []
        self._in_label = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-slot" in attrs:
            self.classes[attrs["data-slot"]] = set(attrs["class"].split())
            self.links[attrs["data-slot"]] = attrs["href"]
        self._in_label = attrs.get("class") == "window-label"

    def handle_data(self, data):
        if self._in_label:
            self.labels.append(data.strip())
            self._in_label = False


class Bar(HTMLParser):
    """The parts of a page's first progress bar, {part: (count, percent)}, and the counts
    written beside it."""

    def __init__(self, html: str):
        super().__init__()
        self.parts, self.counts = {}, []
        self._bars = 0
        self._in_count = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        self._bars += "bar" in classes
        if "bar-part" in classes and self._bars == 1:
            percent = float(re.fullmatch(r"width: ([\d.]+)%", attrs["style"])[1])
            self.parts[attrs["data-part"]] = (attrs["data-count"], percent)
        self._in_count = "count" in classes and self._bars == 1

    def handle_data(self, data):
        if self._in_count:
            self.counts.append(data.strip())
            self._in_count = False


def iso(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


def test_two_hours_of_windows_with_each_slot_against_rpm(rpm3):
    # RPM 3: 45 IDs fill the window, the other 5 are spread over its first five slots.
    task_id = submit(range(1, 51))
    plan_stored_task(task_id, now=PAST)
    run_slot(DEFAULT, FIRST_SLOT)  # long after its time: it ran late
    plan = current_plan(now=at("2026-01-05 09:07:20"))
    hours = plan["hours"]
    assert [(hour["start"], hour["end"]) for hour in hours] == [
        (at("2026-01-05 09:00"), at("2026-01-05 10:00")),
        (at("2026-01-05 10:00"), at("2026-01-05 11:00")),
    ]
    windows = [window for hour in hours for window in hour["windows"]]
    assert [window["start"].minute for window in windows] == [0, 15, 30, 45] * 2
    assert {len(window["slots"]) for window in windows} == {15}
    slots = {slot["start"]: slot for window in windows for slot in window["slots"]}
    ran, waiting, full = (slots[FIRST_SLOT + timedelta(minutes=m)] for m in (0, 1, 5))
    assert (ran["load"], ran["over"], ran["done"], ran["pending"], ran["late"]) == (
        4,
        True,
        4,
        0,
        True,
    )
    assert (waiting["load"], waiting["over"], waiting["pending"], waiting["late"]) == (
        4,
        True,
        4,
        False,
    )
    assert (full["load"], full["over"], full["shade"]) == (3, False, 4)
    assert slots[at("2026-01-05 09:20")]["shade"] == 0
    assert [moment for moment, slot in slots.items() if slot["now"]] == [at("2026-01-05 09:07")]
    assert plan["time_format"] == "%H:%M"


def test_short_slots_make_hours_of_sixty_slots_in_whole_windows(make_app):
    app = make_app(SLOT_SECONDS=2, WINDOW_SLOTS=5)
    with app.app_context():
        plan = current_plan(now=at("2026-01-05 09:01:07"))
    assert [hour["start"] for hour in plan["hours"]] == [
        at("2026-01-05 09:00"),
        at("2026-01-05 09:02"),
    ]
    windows = [window["start"] for hour in plan["hours"] for window in hour["windows"]]
    assert len(windows) == 24
    assert windows[:2] == [at("2026-01-05 09:00:00"), at("2026-01-05 09:00:10")]
    assert plan["time_format"] == "%H:%M:%S"


def test_the_page_draws_cells_links_them_and_lists_the_scheduled_jobs(rpm3):
    # Into the second window of the next hour: a quarter of an hour or more ahead, so
    # every slot job waits in rq-scheduler whenever the test runs.
    now = datetime.now(UTC)
    window = now.replace(minute=15, second=0, microsecond=0) + timedelta(hours=1)
    task_id = submit(range(1, 51))
    plan_stored_task(task_id, now=window - timedelta(seconds=10))
    page = rpm3.test_client().get("/plan")
    later = datetime.now(UTC)
    assert page.status_code == 200
    assert '<meta http-equiv="refresh" content="10">' in page.text
    cells = Cells(page.text)
    assert cells.labels == [":00", ":15", ":30", ":45"] * 2
    assert len(cells.classes) == 120
    over = sorted(slot for slot, classes in cells.classes.items() if "over" in classes)
    assert over == [iso(window + timedelta(minutes=m)) for m in range(5)]
    current = [slot for slot, classes in cells.classes.items() if "now" in classes]
    assert current in ([iso(now)[:17] + "00Z"], [iso(later)[:17] + "00Z"])
    assert "shade-4" in cells.classes[iso(window + timedelta(minutes=5))]
    assert slot_job_id(DEFAULT, window) in page.text
    assert "15 in all" in page.text
    ids = rpm3.test_client().get(cells.links[over[0]])
    assert ids.status_code == 200
    assert len(re.findall(r"<td>pending</td>", ids.text)) == 4


def test_a_slot_page_lists_its_ids_a_page_at_a_time(make_app):
    app = make_app(RPM=120)
    with app.app_context():
        plan_stored_task(submit(range(1, 251)), now=PAST)  # 120 of them in the first slot
    client = app.test_client()
    url = f"/plan/slots/{iso(FIRST_SLOT)}"
    first = client.get(url)
    assert first.status_code == 200
    assert "IDs 1–100 of 120" in first.text
    assert len(re.findall(r"<td>pending</td>", first.text)) == 100
    second = client.get(url + "?page=2")
    assert "IDs 101–120 of 120" in second.text
    assert len(re.findall(r"<td>pending</td>", second.text)) == 20
    assert client.get(url + "?page=3").status_code == 404
    assert client.get("/plan/slots/2026-01-05T10:00:00Z").status_code == 200  # empty


def test_bad_slots_and_pages_are_refused_not_failed(client):
    for slot in ("garbage", "2026-01-05T09:00:30Z", "0001-01-01T00:00:00Z", "2026-13-01"):
        assert client.get(f"/plan/slots/{slot}").status_code == 404, slot
    for page in ("0", "-1", "x", "1.5"):
        answer = client.get(f"/plan/slots/2026-01-05T09:00:00Z?page={page}")
        assert answer.status_code == 422, page
    assert client.get("/plan/slots/2026-01-05T09:00:00Z?utm=1").status_code == 200
    assert client.get("/plan/slots/2026-01-05T10:00:00+01:00").status_code == 200


def test_without_redis_the_page_still_shows_the_plan(make_app):
    answer = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client().get("/plan")
    assert answer.status_code == 200
    assert "Redis could not be read" in answer.text
    assert len(Cells(answer.text).classes) == 120


def test_the_pages_answer_their_errors_as_pages(client):
    refusals = {
        "/plan?limit=nope": (422, "no limit is named 'nope'"),
        "/plan?page=0": (422, "page: Must be greater than or equal to 1."),
        "/plan/slots/garbage": (404, "/plan/slots/garbage names no slot"),
        "/plan/nothing": (404, "there is no page at /plan/nothing"),
        "/plan/slots/2026-01-05T09:00:30Z": (404, "is not the start of a slot"),
        "/plan/slots/2026-01-05T09:00:00Z?limit=nope": (404, "limit 'nope' does not exist"),
        "/plan/tasks/999": (404, "task 999 does not exist"),
        "/plan/tasks/99999999999999999999": (404, "names no task"),
        "/plan/tasks/x": (404, "there is no page at /plan/tasks/x"),
        "/plan/tasks/1?order=sideways": (422, "order: Must be one of: newest, position."),
    }
    for path, (status, message) in refusals.items():
        answer = client.get(path)
        assert (answer.status_code, answer.mimetype) == (status, "text/html"), path
        assert message in html.unescape(answer.text), path
        assert f'<h1><span class="error-code">{status}</span>' in answer.text, path
        assert 'href="/plan">Back to the plan' in answer.text, path


def test_the_api_keeps_its_json_errors(client):
    answer = client.get("/celery_ids_tasks/999/")
    assert (answer.status_code, answer.mimetype) == (404, "application/json")
    assert answer.json["code"] == 404


def test_a_page_asking_for_the_token_still_tells_the_browser_how(make_app):
    answer = make_app(API_TOKEN="s3cret-0123456789").test_client().get("/plan")
    assert (answer.status_code, answer.mimetype) == (401, "text/html")
    assert answer.headers["WWW-Authenticate"].startswith("Basic")
    assert "API token" in answer.text


def record(slot: datetime, failing=(), limit: str = DEFAULT) -> None:
    """A slot's IDs run: those in `failing` failed for good, the others done; user N's
    call ended N seconds after the slot's start."""
    claims = claim(limit_id(limit), slot, new_claimer_id(), 100).claims
    failures = {user: Failure(f"user {user} refused", retry=False) for user in failing}
    ended = {(c.task_id, c.position): slot + timedelta(seconds=c.user_id) for c in claims}
    record_outcomes(SlotOfLimit(limit_id(limit), limit, slot), claims, failures, ended_at=ended)


def next_hours_window() -> datetime:
    """The next hour's second window: every slot of it ahead whenever the test runs."""
    now = datetime.now(UTC)
    return now.replace(minute=15, second=0, microsecond=0) + timedelta(hours=1)


def test_a_task_page_shows_progress_slots_finish_and_failures(rpm3):
    # RPM 3: the ten IDs fill the window's first slots 3, 3, 3 and 1.
    window = next_hours_window()
    task_id = submit(range(1, 11), name="newsletter")
    plan_stored_task(task_id, now=window - timedelta(seconds=10))
    record(window, failing=[2])
    record(window + timedelta(minutes=1), failing=[5, 6])
    page = rpm3.test_client().get(f"/plan/tasks/{task_id}")
    assert (page.status_code, page.mimetype) == (200, "text/html")
    assert f"Task {task_id} · newsletter" in page.text
    assert '<span class="status status-running">running</span>' in page.text
    bar = Bar(page.text)
    assert bar.parts == {"done": ("3", 30.0), "failed": ("3", 30.0), "pending": ("4", 40.0)}
    assert bar.counts == ["done 3", "failed 3", "pending 4"]
    assert "pending 4</span> of 10 IDs" in page.text
    finish = window + timedelta(minutes=4)  # the end of its last slot, the fourth
    assert f"expected by {finish:%Y-%m-%d %H:%M:%S} UTC" in page.text
    assert f"{window:%Y-%m-%d %H:%M:%S} UTC" in page.text
    cells = Cells(page.text)
    assert sorted(cells.links) == [iso(window + timedelta(minutes=m)) for m in range(4)]
    assert cells.links[iso(window)] == f"/plan/slots/{iso(window)}?limit=default"
    assert "4 slots;" in page.text
    assert f'href="/plan?limit=default&amp;task={task_id}">Its slots marked' in page.text
    rows = re.findall(
        r"<td>(\d+)</td>\s*<td>(\d+)</td>\s*<td>(\d+)</td>\s*<td class=\"error\">([^<]*)</td>",
        page.text,
    )
    assert rows == [
        ("5", "6", "1", "user 6 refused"),
        ("4", "5", "1", "user 5 refused"),
        ("1", "2", "1", "user 2 refused"),
    ]
    in_order = rpm3.test_client().get(f"/plan/tasks/{task_id}?order=position")
    rows = re.findall(
        r"<td>\d+</td>\s*<td>(\d+)</td>\s*<td>\d+</td>\s*<td class=\"error\">", in_order.text
    )
    assert rows == ["2", "5", "6"]
    assert rpm3.test_client().get(f"/plan/tasks/{task_id}?page=2").status_code == 404
    slot = rpm3.test_client().get(cells.links[iso(window)]).text
    assert f'<a href="/plan/tasks/{task_id}">{task_id}</a>' in slot  # back to the task


def test_a_task_page_tells_when_a_finished_an_unplanned_and_a_paused_task_ends(rpm3):
    window = next_hours_window()
    finished = submit([1, 2], name="small")
    plan_stored_task(finished, now=window - timedelta(seconds=10))
    record(window, failing=[2])
    client = rpm3.test_client()
    page = client.get(f"/plan/tasks/{finished}").text
    assert '<span class="status status-failed">failed</span>' in page
    assert f"finished {window + timedelta(seconds=2):%Y-%m-%d %H:%M:%S} UTC" in page
    waiting = submit([3])
    page = client.get(f"/plan/tasks/{waiting}").text
    assert "not planned yet" in page
    assert "None of its IDs is in a slot yet." in page
    assert "None of its IDs failed so far." in page
    plan_stored_task(waiting, now=window - timedelta(seconds=10))
    pause(DEFAULT)
    page = client.get(f"/plan/tasks/{waiting}").text
    assert (
        f"its limit is paused; its plan ended {window + timedelta(minutes=1):%Y-%m-%d %H:%M:%S}"
        in page
    )
    assert client.delete(f"/celery_ids_tasks/{waiting}/").status_code == 204
    page = client.get(f"/plan/tasks/{waiting}").text
    assert "cancelled before any of its IDs ran" in page
    assert Bar(page).parts == {"cancelled": ("1", 100.0)}


def test_the_plan_lists_its_tasks_and_latest_failures_and_marks_a_tasks_slots(rpm3):
    window = next_hours_window()
    first = submit(range(1, 11), name="newsletter")
    plan_stored_task(first, now=window - timedelta(seconds=10))
    record(window, failing=[2])
    second = submit([11, 12], name="reminder")
    plan_stored_task(second, now=window - timedelta(seconds=10))
    later = submit([13], name="next week")
    plan_stored_task(later, now=window + timedelta(days=7))
    client = rpm3.test_client()
    page = client.get("/plan").text
    listed = re.findall(r'<tr data-task="(\d+)">\s*<td><a href="/plan/tasks/\d+">', page)
    assert listed == [str(first), str(second)]  # the third is planned a week ahead
    assert Bar(page).counts == ["done 2", "failed 1", "pending 7"]
    finish = window + timedelta(minutes=4)
    assert f"expected by {finish:%Y-%m-%d %H:%M:%S} UTC" in page
    failures = re.findall(
        r'<td><a href="/plan/tasks/(\d+)">\d+ · newsletter</a></td>\s*<td>(\d+)</td>'
        r'\s*<td>\d+</td>\s*<td class="error">([^<]*)</td>',
        page,
    )
    assert failures == [(str(first), "2", "user 2 refused")]
    marked = Cells(client.get(f"/plan?task={second}").text)
    held = sorted(slot for slot, classes in marked.classes.items() if "marked" in classes)
    # RPM 3: the first task left two free places in its fourth slot.
    assert held == [iso(window + timedelta(minutes=3))]
    assert "(1 slot; " in client.get(f"/plan?task={second}").text
    assert not any("marked" in classes for classes in Cells(page).classes.values())
    assert client.get("/plan?task=0").status_code == 422


def test_the_grid_labels_its_columns_and_draws_past_slots_apart(rpm3):
    plan = current_plan(now=at("2026-01-05 09:07:20"))
    assert plan["columns"] == [f"+{m}" for m in range(15)]
    slots = {
        slot["start"]: slot
        for hour in plan["hours"]
        for w in hour["windows"]
        for slot in w["slots"]
    }
    past = sorted(moment for moment, slot in slots.items() if slot["past"])
    assert past == [at("2026-01-05 09:00") + timedelta(minutes=m) for m in range(7)]
    page = rpm3.test_client().get("/plan").text
    labels = re.findall(r'<span class="column">([^<]*)</span>', page)
    assert labels == [f"+{m}" for m in range(15)] * 2
    cells = Cells(page)
    now = datetime.now(UTC)
    ahead = iso(now.replace(second=0, microsecond=0) + timedelta(minutes=1))
    assert "past" not in cells.classes[ahead]
    gone = [slot for slot, classes in cells.classes.items() if "past" in classes]
    assert all(slot < iso(now) for slot in gone)
    assert len(gone) in (now.minute, now.minute - 1) or now.minute == 0


def test_short_slots_label_their_columns_in_seconds(make_app):
    app = make_app(SLOT_SECONDS=2, WINDOW_SLOTS=5)
    with app.app_context():
        plan = current_plan(now=at("2026-01-05 09:01:07"))
    assert plan["columns"] == ["+0s", "+2s", "+4s", "+6s", "+8s"]


class Rows(HTMLParser):
    """The text of each cell of the rows that carry `data-<key>`, by that value."""

    def __init__(self, html: str, key: str):
        super().__init__()
        self.rows, self._key, self._row, self._cell = {}, f"data-{key}", None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self._row = attrs.get(self._key)
            if self._row:
                self.rows[self._row] = []
        elif tag == "td" and self._row:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._row and self._cell is not None:
            self.rows[self._row].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_the_limits_page_shows_every_limits_load_pending_ids_and_backlog(rpm3):
    window = next_hours_window()
    task_id = submit(range(1, 11))
    plan_stored_task(task_id, now=window - timedelta(seconds=10))
    record(window, failing=[2])
    add_limit("partner", 5)
    pause("partner")
    now = datetime.now(UTC)
    set_load(now.replace(second=0, microsecond=0), 2)  # the current slot of the default
    page = rpm3.test_client().get("/plan/limits")
    assert (page.status_code, page.mimetype) == (200, "text/html")
    rows = Rows(page.text, "limit").rows
    assert list(rows) == ["default", "partner"]
    name, rpm, state, load, pending, failed, backlog = rows["default"]
    assert (name, rpm, state, pending, failed) == ("default", "3", "running", "7", "1")
    assert load in ("2 / 3", "0 / 3")  # 0 once the minute turned
    end = window + timedelta(minutes=4)
    assert backlog.startswith(f"{end:%Y-%m-%d %H:%M:%S} UTC (in ")
    assert (
        f"its last slot with pending IDs: {window + timedelta(minutes=3):%Y-%m-%d %H:%M}" in backlog
    )
    assert rows["partner"][:6] == ["partner", "5", "paused", "0 / 5", "0", "0"]
    assert rows["partner"][6] == "nothing pending in a slot"
    assert 'href="/plan?limit=partner">partner</a>' in page.text
    assert 'href="/plan/limits">every limit at a glance</a>' in rpm3.test_client().get("/plan").text


def test_a_backlog_ends_in_words_ahead_or_behind(rpm3):
    window = next_hours_window()
    plan_stored_task(submit(range(1, 4)), now=window - timedelta(seconds=10))
    ahead = limits_overview(now=window - timedelta(hours=1, seconds=20))["limits"][0]["backlog"]
    assert (ahead["end"], ahead["left"], ahead["overdue"]) == (
        window + timedelta(minutes=1),
        "in 1 h 1 min",
        False,
    )
    behind = limits_overview(now=window + timedelta(minutes=4))["limits"][0]["backlog"]
    assert (behind["left"], behind["overdue"]) == ("3 min ago", True)
    soon = limits_overview(now=window + timedelta(seconds=20))["limits"][0]["backlog"]
    assert soon["left"] == "in 40 s"
