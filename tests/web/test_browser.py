"""What a person sees in a real browser: the plan pages and Swagger UI, served by the app
in a process of its own and opened in Debian's headless chromium through chromedriver.

Without chromium the tests are skipped, saying why; with REQUIRE_BROWSER=1 (as in CI)
they fail instead, so a machine without a browser cannot pass them silently.
"""

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from service.limits import settings as shared_settings
from service.planning.resume import pause
from service.planning.windows import plan_stored_task

from ..helpers import add_limit, set_load, submit
from ..processes import free_port, start, stop, wait_for_http
from .test_learned_rate_pages import planned_at_rpm_3_then_learned_2
from .test_plan_page import next_hours_window, record

pytestmark = pytest.mark.slow

# Debian's packages chromium and chromium-driver.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

BACKGROUND = "return getComputedStyle(document.querySelector(arguments[0])).backgroundColor"
LOOK = """
const cell = document.querySelector(arguments[0]), style = getComputedStyle(cell);
return {image: style.backgroundImage, opacity: style.opacity,
        load: cell.querySelector('.load').textContent};
"""


@pytest.fixture
def browser(tmp_path, monkeypatch):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        reason = f"no {' or '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # The driver is named, so selenium-manager is never asked for one; were it asked
    # all the same, offline it downloads nothing.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests run as root, where chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(app):
    """The app served over HTTP by `flask run`, on the tests' database and Redis."""
    port = free_port()
    process = start(["run", "--port", str(port)], {})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/", process, timeout=60)
        yield base
    finally:
        stop([process])


def minute(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M}:00Z"


def a_slot_of_the_hour_gone_by() -> datetime:
    """Now, once the clock hour's first slot has gone by: at most a minute's wait."""
    now = datetime.now(UTC)
    if now.minute == 0:
        time.sleep(61 - now.second)
    return datetime.now(UTC)


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(part) for part in css[css.index("(") + 1 : -1].split(",")[:3])


def test_the_plan_page_shows_windows_loads_above_rpm_and_now(browser, app, server, tmp_path):
    before = datetime.now(UTC)
    # Into the next hour's second window, at RPM 3: 45 IDs fill it, 5 more are spread
    # over its first five slots, which end above RPM.
    window = before.replace(minute=15, second=0, microsecond=0) + timedelta(hours=1)
    with app.app_context():
        shared_settings.change({"RPM": 3})  # the served app draws by the same RPM
        plan_stored_task(submit(range(1, 51)), now=window - timedelta(seconds=10))

    browser.get(server + "/plan")
    after = datetime.now(UTC)
    browser.save_screenshot(str(tmp_path / "plan.png"))

    assert len(browser.find_elements(By.CSS_SELECTOR, ".window")) == 8
    labels = [label.text for label in browser.find_elements(By.CSS_SELECTOR, ".window-label")]
    assert labels == [":00", ":15", ":30", ":45"] * 2
    above = f'.cell[data-slot="{minute(window)}"]'
    at_rpm = f'.cell[data-slot="{minute(window + timedelta(minutes=5))}"]'
    empty = f'.cell[data-slot="{minute(window + timedelta(minutes=15))}"]'
    assert browser.find_element(By.CSS_SELECTOR, above).text.startswith("4")
    colours = {
        name: rgb(browser.execute_script(BACKGROUND, css))
        for name, css in (("above", above), ("at_rpm", at_rpm), ("empty", empty))
    }
    assert len(set(colours.values())) == 3, colours
    red, green, blue = colours["above"]
    assert red > 150 and red > green + 80 and red > blue + 80, colours  # red, unlike the rest
    (current,) = browser.find_elements(By.CSS_SELECTOR, ".cell.now")
    assert current.get_attribute("data-slot") in (minute(before), minute(after))
    assert current.is_displayed()
    assert current.value_of_css_property("outline-style") == "solid"
    assert (
        browser.find_element(By.CSS_SELECTOR, at_rpm).value_of_css_property("outline-style")
        == "none"
    )
    assert (tmp_path / "plan.png").read_bytes().startswith(b"\x89PNG")


def test_the_grid_labels_its_columns_and_draws_past_slots_apart(browser, app, server, tmp_path):
    now = a_slot_of_the_hour_gone_by()
    window = now.replace(minute=15, second=0, microsecond=0) + timedelta(hours=1)
    with app.app_context():
        shared_settings.change({"RPM": 3})
        task_id = submit(range(1, 11), name="newsletter")
        plan_stored_task(task_id, now=window - timedelta(seconds=10))
        record(window, failing=[2])

    browser.get(server + "/plan")
    browser.save_screenshot(str(tmp_path / "plan_tasks.png"))

    header = browser.find_elements(By.CSS_SELECTOR, ".hour")[0]
    columns = header.find_elements(By.CSS_SELECTOR, ".columns .column")
    assert [column.text for column in columns] == [f"+{m}" for m in range(15)]
    cells = header.find_elements(By.CSS_SELECTOR, ".window")[0].find_elements(
        By.CSS_SELECTOR, ".cell"
    )
    centres = [
        (element.location["x"] + element.size["width"] / 2) for element in (*columns, *cells)
    ]
    assert centres[:15] == pytest.approx(centres[15:], abs=1.5)  # each label over its column
    gone = f'.cell[data-slot="{minute(now.replace(minute=0))}"]'
    ahead = f'.cell[data-slot="{minute(window + timedelta(minutes=30))}"]'
    looks = {
        name: browser.execute_script(LOOK, css) for name, css in (("gone", gone), ("ahead", ahead))
    }
    assert "past" in browser.find_element(By.CSS_SELECTOR, gone).get_attribute("class")
    assert looks["gone"]["load"] == looks["ahead"]["load"] == "0"  # both empty
    assert looks["gone"]["image"].startswith("repeating-linear-gradient"), looks
    assert looks["ahead"]["image"] == "none", looks
    assert float(looks["gone"]["opacity"]) < float(looks["ahead"]["opacity"]), looks
    row = browser.find_element(By.CSS_SELECTOR, f'.tasks tr[data-task="{task_id}"]')
    assert "done 2 · failed 1 · pending 7 of 10 IDs" in row.text
    failure = browser.find_element(By.CSS_SELECTOR, ".failures tbody tr")
    assert "user 2 refused" in failure.text
    row.find_element(By.CSS_SELECTOR, "a").click()
    assert browser.current_url == f"{server}/plan/tasks/{task_id}"
    browser.find_element(By.CSS_SELECTOR, "a.on-the-plan").click()
    browser.save_screenshot(str(tmp_path / "plan_marked.png"))
    marked = browser.find_elements(By.CSS_SELECTOR, ".cell.marked")
    slots = [minute(window + timedelta(minutes=m)) for m in range(4)]
    assert [cell.get_attribute("data-slot") for cell in marked] == slots
    assert "inset" in marked[0].value_of_css_property("box-shadow")
    unmarked = browser.find_element(By.CSS_SELECTOR, ahead)
    assert unmarked.value_of_css_property("box-shadow") == "none"


AFTER = "return getComputedStyle(document.querySelector(arguments[0]), '::after').content"


def test_the_plan_page_draws_a_learned_rate_and_replanned_slots(browser, app, server, tmp_path):
    with app.app_context():
        shared_settings.change({"RPM": 3})
        window, third, fourth = planned_at_rpm_3_then_learned_2()

    browser.get(server + "/plan")
    browser.save_screenshot(str(tmp_path / "plan_learned.png"))

    summary = browser.find_element(By.CSS_SELECTOR, ".summary")
    assert "RPM 3 · learned 2 · slots of 60 s" in summary.text
    learned = summary.find_element(By.CSS_SELECTOR, ".learned")
    red, green, blue = rgb(learned.value_of_css_property("color"))
    assert red > blue + 80  # amber, apart from the grey text around it
    legend = browser.find_element(By.CSS_SELECTOR, ".legend").text
    assert "re-planned" in legend and "above learned rate" in legend
    replanned = browser.find_elements(By.CSS_SELECTOR, ".cell.replanned")
    marked = [cell.get_attribute("data-slot") for cell in replanned]
    assert marked == [minute(third), minute(fourth)]
    assert "re-planned" in replanned[0].get_attribute("title")
    first, marked_one = (f'.cell[data-slot="{minute(slot)}"]' for slot in (window, third))
    assert browser.execute_script(AFTER, marked_one) == '"\u21bb"'  # a circling arrow
    assert browser.execute_script(AFTER, first) == "none"
    # Planned at RPM 3 before the rate was learned: above it now, so red.
    red, green, blue = rgb(browser.execute_script(BACKGROUND, first))
    assert red > green + 80 and red > blue + 80
    assert (tmp_path / "plan_learned.png").read_bytes().startswith(b"\x89PNG")


def test_swagger_ui_renders_from_assets_the_app_serves(browser, server, tmp_path):
    browser.get(server + "/docs")
    paths = WebDriverWait(browser, 30).until(
        lambda page: [
            path.get_attribute("data-path")
            for path in page.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        ]
    )
    browser.save_screenshot(str(tmp_path / "docs.png"))
    assert "/celery_ids_tasks/" in paths
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert loaded and all(url.startswith(server + "/") for url in loaded), loaded


def test_a_task_page_draws_its_progress_and_lists_its_failures(browser, app, server, tmp_path):
    window = next_hours_window()
    with app.app_context():
        shared_settings.change({"RPM": 3})
        task_id = submit(range(1, 11), name="newsletter")
        plan_stored_task(task_id, now=window - timedelta(seconds=10))
        record(window, failing=[2])
        record(window + timedelta(minutes=1), failing=[5, 6])

    browser.get(f"{server}/plan/tasks/{task_id}")
    browser.save_screenshot(str(tmp_path / "task.png"))

    assert browser.find_element(By.TAG_NAME, "h1").text == f"Task {task_id} · newsletter"
    bar = browser.find_element(By.CSS_SELECTOR, ".progress .bar")
    parts = bar.find_elements(By.CSS_SELECTOR, ".bar-part")
    assert [part.get_attribute("data-part") for part in parts] == ["done", "failed", "pending"]
    widths = [part.size["width"] / bar.size["width"] for part in parts]
    assert widths == pytest.approx([0.3, 0.3, 0.4], abs=0.02), widths
    colours = [rgb(part.value_of_css_property("background-color")) for part in parts]
    (red, green, _), (red_2, green_2, _) = colours[0], colours[1]
    assert green > red + 60 and red_2 > green_2 + 80, colours  # done green, failed red
    counts = [count.text for count in browser.find_elements(By.CSS_SELECTOR, ".progress .count")]
    assert counts == ["done 3", "failed 3", "pending 4"]
    finish = window + timedelta(minutes=4)
    assert (
        f"expected by {finish:%Y-%m-%d %H:%M:%S} UTC"
        in browser.find_element(By.CSS_SELECTOR, ".finish").text
    )
    errors = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, ".failures td.error")]
    assert errors == ["user 6 refused", "user 5 refused", "user 2 refused"]
    browser.find_element(By.CSS_SELECTOR, f'.chip[data-slot="{minute(window)}"]').click()
    assert browser.current_url == f"{server}/plan/slots/{minute(window)}?limit=default"
    assert (tmp_path / "task.png").read_bytes().startswith(b"\x89PNG")


def test_the_limits_page_shows_each_limit_and_links_its_plan(browser, app, server, tmp_path):
    window = next_hours_window()
    with app.app_context():
        shared_settings.change({"RPM": 3})
        plan_stored_task(submit(range(1, 11)), now=window - timedelta(seconds=10))
        add_limit("partner", 5)
        pause("partner")
        set_load(datetime.now(UTC).replace(second=0, microsecond=0), 2)  # the current slot

    browser.get(server + "/plan/limits")
    browser.save_screenshot(str(tmp_path / "limits.png"))

    rows = browser.find_elements(By.CSS_SELECTOR, ".limits-table tbody tr")
    assert [row.get_attribute("data-limit") for row in rows] == ["default", "partner"]
    cells = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [cells[0][i] for i in (0, 1, 2, 4)] == ["default", "3", "running", "10"]
    assert [cells[1][i] for i in (0, 1, 2, 4)] == ["partner", "5", "paused", "0"]
    end = window + timedelta(minutes=4)
    assert cells[0][6].startswith(f"{end:%Y-%m-%d %H:%M:%S} UTC (in ")
    assert cells[1][6] == "nothing pending in a slot"
    meter = rows[0].find_element(By.CSS_SELECTOR, ".meter")
    share = meter.find_element(By.CSS_SELECTOR, ".meter-fill").size["width"] / meter.size["width"]
    # 2 of RPM 3 in the current slot, unless the minute turned before the page was read.
    assert (cells[0][3], share) in (
        ("2 / 3", pytest.approx(2 / 3, abs=0.05)),
        ("0 / 3", pytest.approx(0, abs=0.05)),
    )
    paused = rows[1].find_element(By.CSS_SELECTOR, ".status")
    red, green, blue = rgb(paused.value_of_css_property("color"))
    assert red > green + 80 and red > blue + 80  # paused reads as a warning
    rows[1].find_element(By.LINK_TEXT, "partner").click()
    assert browser.current_url == f"{server}/plan?limit=partner"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Plan of the limit partner"
    assert (tmp_path / "limits.png").read_bytes().startswith(b"\x89PNG")


def test_an_unknown_limit_answers_a_page_that_says_so(browser, server, tmp_path):
    browser.get(server + "/plan?limit=nope")
    browser.save_screenshot(str(tmp_path / "error.png"))
    status = browser.execute_script(
        "return performance.getEntriesByType('navigation')[0].responseStatus"
    )
    assert status in (404, 422)
    heading = browser.find_element(By.TAG_NAME, "h1").text
    assert heading.startswith(str(status))
    assert (
        "no limit is named 'nope'" in browser.find_element(By.CSS_SELECTOR, ".error-message").text
    )
    assert browser.find_elements(By.TAG_NAME, "pre") == []  # not JSON shown raw
    browser.find_element(By.LINK_TEXT, "Back to the plan").click()
    assert browser.find_element(By.TAG_NAME, "h1").text == "Plan of the limit default"
