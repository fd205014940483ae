"""Dispatch: running each slot (claims, pacing, calls, outcomes), the claimers that hold
claims, the worker, and reconcile."""
