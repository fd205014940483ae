"""gunicorn reads this file from the working directory: the web refuses to start when its
shared settings disagree with the deployment's (see service/shared_settings.py)."""

import sys


def on_starting(server):
    from service import create_app
    from service.shared_settings import SettingsConflict, record_and_check

    with create_app().app_context():
        try:
            record_and_check()
        except SettingsConflict as conflict:
            print(f"Error: {conflict}", file=sys.stderr)
            sys.exit(1)
