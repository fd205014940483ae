"""RQ job functions. Each takes plain arguments and runs inside an app context."""
