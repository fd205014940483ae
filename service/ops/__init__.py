"""Operation: readiness and metrics, and the stack that `make run` starts."""
