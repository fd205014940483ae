"""Processors: the contract a slot job hands a limit's IDs through, and the built-in ones."""
