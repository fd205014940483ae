"""Periodic jobs; service.scheduling.PERIODIC_JOBS declares when they run."""

from __future__ import annotations

from service.dispatch import reconcile as reconcile_in_app

from .context import job_context


def reconcile() -> dict[str, int]:
    """Rebuild the schedule from PostgreSQL (see service.dispatch.reconcile)."""
    with job_context():
        return reconcile_in_app()
