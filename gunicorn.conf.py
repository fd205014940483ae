"""gunicorn reads this file from the working directory: the web refuses to start when its
shared settings disagree with the deployment's (see service/shared_settings.py), names
the limits its settings hold (service/limits/held.py) in its log, and its
worker processes share their request metrics through PROMETHEUS_MULTIPROC_DIR (see
service/metrics.py)."""

import sys


def on_starting(server):
    from service import create_app
    from service.core.outages import wait_for_servers
    from service.limits.held import log_held_limits
    from service.limits.settings import SettingsConflict, record_and_check
    from service.ops.metrics import clear_multiprocess_dir

    # Before any worker is forked: counts of an earlier run would be added to this one's.
    clear_multiprocess_dir()
    with create_app().app_context():
        try:
            # A database that is away is waited for: it is no reason not to start.
            wait_for_servers(record_and_check, "waiting for PostgreSQL")
        except SettingsConflict as conflict:
            print(f"Error: {conflict}", file=sys.stderr)
            sys.exit(1)
        # Limits whose destination these settings do not allow are held: said once here.
        wait_for_servers(log_held_limits, "waiting for PostgreSQL")


def child_exit(server, worker):
    from service.ops.metrics import forget_process

    forget_process(worker.pid)
