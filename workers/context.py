"""The app context that jobs run in."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app, has_app_context

from service import create_app
from service.core.extensions import db

_process_app: Flask | None = None
_pool_owner_pid: int | None = None


def _app() -> Flask:
    global _process_app
    if has_app_context():
        return current_app._get_current_object()
    if _process_app is None:
        _process_app = create_app()
    return _process_app


@contextmanager
def job_context() -> Iterator[Flask]:
    """Run a job inside an app context, reusing the worker's own when there is one."""
    global _pool_owner_pid
    app = _app()
    with app.app_context():
        # RQ forks a child per job: a pooled connection inherited across the fork would
        # be shared by two processes, so the child forgets the inherited ones first.
        if _pool_owner_pid != os.getpid():
            db.engine.dispose(close=False)
            _pool_owner_pid = os.getpid()
        try:
            yield app
        finally:
            db.session.remove()
