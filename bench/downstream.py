"""The service's throughput against a downstream that is not CPU-bound, run by hand:
`DATABASE_URL=postgresql://postgres@127.0.0.1:5432/<own db> REDIS_URL=redis://127.0.0.1:6379/<n>
python -m bench.downstream [RATE ...]` (rates per minute, default 12000 24000 60000;
`--rates 12000 24000` works too).

It starts a node server (bench/downstream_server.js) that answers every call after 200 ms,
once for the whole run. For each rate it runs the real stack (`flask scheduler` and four
`flask worker` processes) with 2-s slots, windows of 15, a plan lead of 0.5 s, RPM of the
rate's calls a 2-s slot, four helpers a slot at most and the default limit calling the node
server through `workers.processors:http_request`, and plans one task (overflow `defer`) of
ten slots' worth of IDs whose first slot starts a few seconds later. Once every call has
arrived (or a minute after the last slot), it reads the server's record of the calls and
prints, per rate: the IDs called of those planned, the share that arrived inside their
planned slot, the p99 of how long after its slot's start an ID arrived, the machine's CPU
time (all processes, from /proc/stat) per ID from just before the first slot to the last
call's answer, the same per call for a bare aiohttp client that makes as many calls at the
same rate, evenly paced, in a process of its own while the stack is stopped, the ratio of
the two, the most calls in flight at the server and the connections it saw opened.

It empties the tables and the Redis database it is given: use ones of its own. It writes
nothing in the repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp
import flask_migrate
from rq import Worker
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task
from tests.helpers import percentile
from tests.processes import start, stop

SLOT = 2
SLOTS = 10
LEAD = 0.5
WORKERS = 4
LATENCY_MS = 200
RATES = (12_000, 24_000, 60_000)  # per minute
# The last call's answer is back 200 ms after it arrived; a little more covers the worker
# recording its outcome, which is part of what an ID costs.
ANSWERED = 0.5
# The minute after the last slot that a run behind its plan is given to finish.
GRACE = 60
# Outside the stack's processes, so never sent through a proxy the environment names.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy since boot (the `cpu` line of
    /proc/stat: user, nice, system, irq, softirq and steal)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Downstream:
    """The node server, on a free port: it prints the port once it listens."""

    def __enter__(self) -> Downstream:
        self.process = subprocess.Popen(
            ["node", str(ROOT / "bench" / "downstream_server.js")],
            env={**os.environ, "LATENCY_MS": str(LATENCY_MS), "PORT": "0"},
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.process.kill()
            raise RuntimeError(f"the node downstream did not start (it printed {line!r})")
        self.base = f"http://127.0.0.1:{int(line)}"
        self.url = self.base + "/u/{id}"
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _get(self, path: str) -> dict:
        with LOCAL.open(self.base + path, timeout=10) as answer:
            return json.load(answer)

    def count(self) -> dict:
        return self._get("/_count")

    def record(self) -> dict:
        return self._get("/_record")


def reset() -> None:
    # The default limit goes too: recorded again from this run's settings, its URL names
    # this run's downstream (a limit naming an earlier one is held, outside its prefix),
    # and with it any rate an earlier run learned, which would plan this one slower.
    db.session.execute(
        text(
            "TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, settings, "
            "limits, learned_rates, limit_events"
        )
    )
    db.session.commit()
    get_redis().flushdb()


def wait_for_stack(processes: list[subprocess.Popen], timeout: float = 60) -> None:
    """Until every worker and the scheduler is serving: a process still importing when
    the first slot starts would add its start-up to the CPU counted for the IDs."""
    redis = get_redis()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = [process.args for process in processes if process.poll() is not None]
        if ended:
            raise RuntimeError(f"exited before serving: {ended}")
        scheduler = next(redis.scan_iter("rq:scheduler_instance:*"), None)
        if scheduler and Worker.count(connection=redis) >= WORKERS:
            return
        time.sleep(0.2)
    raise RuntimeError("the stack did not start in time")


def planned_slots(task_id: int) -> dict[int, float]:
    rows = db.session.execute(
        text("SELECT user_id, slot_start FROM assignments WHERE task_id = :t"), {"t": task_id}
    )
    return {user_id: slot_start.timestamp() for user_id, slot_start in rows}


def cpu_until(samples: list[tuple[float, float]], moment: float) -> float:
    """The machine's CPU seconds at the first sample taken at `moment` or after."""
    while time.time() < moment:
        time.sleep(min(0.05, moment - time.time()))
    if samples[-1][0] < moment:
        samples.append((time.time(), machine_cpu()))
    return next(cpu for taken, cpu in samples if taken >= moment)


def run(rate: int, downstream: Downstream) -> dict:
    per_slot = rate * SLOT // 60
    total = per_slot * SLOTS
    settings = {
        "SLOT_SECONDS": SLOT,
        "WINDOW_SLOTS": 15,
        "PLAN_LEAD_SECONDS": LEAD,
        "RPM": per_slot,
        "ID_PROCESSOR": "workers.processors:http_request",
        "PROCESSOR_HTTP_URL": downstream.url,
        "PROCESSOR_HTTP_TIMEOUT": 30,
        "MAX_HELPERS_PER_SLOT": 4,
    }
    app = create_app_with(settings)
    with app.app_context():
        reset()
        downstream.record()  # calls of an earlier run that came late are not this one's
        processes = [start(["scheduler"], settings)]
        processes += [start(["worker"], settings) for _ in range(WORKERS)]
        try:
            wait_for_stack(processes)
            task = submit_task("bench", range(1, total + 1), "defer")
            plan_stored_task(task.id, now=datetime.now(UTC) + timedelta(seconds=4))
            slots = planned_slots(task.id)
            first, last = min(slots.values()), max(slots.values())
            # From when the first slot's job may begin: its claims are part of the cost.
            begin = first - LEAD
            late = time.time() - begin
            while time.time() < begin:
                time.sleep(min(0.05, begin - time.time()))
            samples = [(time.time(), machine_cpu())]
            deadline = last + SLOT + GRACE
            count = downstream.count()
            while count["arrivals"] < total and time.time() < deadline:
                time.sleep(0.1)
                count = downstream.count()
                samples.append((time.time(), machine_cpu()))
            if count["last"] is not None:
                cpu = cpu_until(samples, count["last"] + ANSWERED) - samples[0][1]
            else:
                cpu = float("nan")
            record = downstream.record()
        finally:
            stop(processes)
    arrived: dict[int, float] = {}
    for moment, user_id in record["arrivals"]:
        arrived.setdefault(user_id, moment)  # a retried ID counts at its first call
    offsets = [moment - slots[user_id] for user_id, moment in arrived.items()]
    inside = sum(0 <= offset < SLOT for offset in offsets)
    return {
        "ids": len(arrived),
        "of": total,
        "inside": inside / total,
        "p99": percentile(offsets, 0.99) if offsets else float("nan"),
        "cpu_per_id": cpu / len(arrived) if arrived else float("nan"),
        "in_flight": record["most_in_flight"],
        "connections": record["connections"],
        "late": max(0.0, late),
    }


async def _bare_calls(url: str, total: int, per_second: float) -> dict:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(user_id: int) -> bool:
            # As the service calls: POST with an Idempotency-Key, the answer read.
            headers = {"Idempotency-Key": f"bare-{user_id}"}
            try:
                async with session.post(url.format(id=user_id), headers=headers) as answer:
                    await answer.read()
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        loop = asyncio.get_running_loop()
        calls = []
        cpu_start = machine_cpu()
        start_at = loop.time()
        for k in range(total):
            delay = start_at + k / per_second - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.create_task(call(k + 1)))
        answered = await asyncio.gather(*calls)
        cpu = machine_cpu() - cpu_start
    return {"cpu": cpu, "answered": sum(answered)}


def bare_client(url: str, total: int, per_second: float) -> dict:
    return asyncio.run(_bare_calls(url, total, per_second))


def baseline(rate: int, total: int, downstream: Downstream) -> dict:
    """The same calls from a bare aiohttp client, in a process of its own so that its
    imports come before the count and the bench's own process stays out of its loop."""
    downstream.record()
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        figures = pool.submit(bare_client, downstream.url, total, rate / 60).result()
    figures["arrived"] = len(downstream.record()["arrivals"])
    figures["cpu_per_call"] = figures["cpu"] / total
    return figures


def create_app_with(settings: dict):
    os.environ.update({name: str(value) for name, value in settings.items()})
    return create_app()


def main() -> None:
    rates = [int(arg) for arg in sys.argv[1:] if arg != "--rates"] or RATES
    with create_app().app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
    print(
        f"{SLOT}-s slots, {SLOTS} slots a rate, {WORKERS} workers, node downstream answering "
        f"in {LATENCY_MS} ms, {os.cpu_count()} CPUs; CPU is the whole machine's"
    )
    with Downstream() as downstream:
        # Every CPU figure is the whole machine's: whatever else runs on it counts too.
        before = machine_cpu()
        time.sleep(3)
        idle = (machine_cpu() - before) / 3
        print(f"machine busy before the runs: {idle:.2f} CPU-s a second", flush=True)
        print(
            f"{'rate/min':>8} {'IDs arrived':>13} {'inside slot':>12} {'p99 from start':>15} "
            f"{'CPU/ID':>9} {'bare CPU/call':>14} {'ratio':>6} {'in flight':>10} "
            f"{'connections':>12}"
        )
        for rate in rates:
            figures = run(rate, downstream)
            bare = baseline(rate, figures["of"], downstream)
            print(
                f"{rate:>8} {figures['ids']:>6}/{figures['of']:<6} "
                f"{figures['inside']:>11.1%} {figures['p99']:>14.2f}s "
                f"{figures['cpu_per_id'] * 1000:>7.2f}ms {bare['cpu_per_call'] * 1000:>12.2f}ms "
                f"{figures['cpu_per_id'] / bare['cpu_per_call']:>6.1f} "
                f"{figures['in_flight']:>10} {figures['connections']:>12}",
                flush=True,
            )
            if figures["late"] > 0:
                print(
                    f"{'':>8} planning ended {figures['late']:.1f} s after the first slot's "
                    "job was due: its CPU count began late",
                    flush=True,
                )
            if bare["answered"] < figures["of"] or bare["arrived"] < figures["of"]:
                print(
                    f"{'':>8} bare client: {bare['answered']} answered, {bare['arrived']} "
                    f"arrived of {figures['of']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
