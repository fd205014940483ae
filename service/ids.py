"""Validation of submitted user IDs: positive integers that fit in 64 bits."""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_ID = 2**63 - 1
_MAX_DIGITS = len(str(MAX_ID))
# Errors name at most this many bad entries: enough to fix a file, short enough to read.
MAX_REPORTED_ERRORS = 20
_SEPARATORS = re.compile(r"[,\s]+")


class InvalidIds(ValueError):
    """One or more IDs are malformed; `errors` maps each bad index to its reason."""

    def __init__(self, errors: dict[int, str]):
        super().__init__(f"{len(errors)} invalid ID(s)")
        self.errors = errors


def id_from_token(token: str) -> int:
    """Parse one textual ID, raising ValueError with the reason."""
    if not (token.isascii() and token.isdigit()):
        raise ValueError(f"{token[:40]!r} is not a positive integer")
    if len(token.lstrip("0")) > _MAX_DIGITS or int(token) > MAX_ID:
        raise ValueError(f"{token[:40]!r} is beyond 64 bits (max {MAX_ID})")
    value = int(token)
    if value < 1:
        raise ValueError(f"{token!r} must be at least 1")
    return value


def id_from_json(value: object) -> int:
    """Check one JSON value, raising ValueError with the reason."""
    # bool is an int subclass, and a float or a string is an integer only by accident.
    if type(value) is not int:
        kind = {bool: "a boolean", float: "a float", str: "a string"}.get(
            type(value), "not a number"
        )
        raise ValueError(f"{str(value)[:40]!r} is {kind}; expected an integer")
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    if value > MAX_ID:
        raise ValueError(f"{str(value)[:40]} is beyond 64 bits (max {MAX_ID})")
    return value


def split_payload(payload: str) -> list[str]:
    """The tokens of an ID string: separated by commas and/or whitespace."""
    return [token for token in _SEPARATORS.split(payload) if token]


def validated(values: Iterable, check) -> list[int]:
    """Apply `check` to every value; raise InvalidIds naming each bad index."""
    errors: dict[int, str] = {}
    checked = []
    for index, value in enumerate(values):
        try:
            checked.append(check(value))
        except ValueError as exc:
            errors[index] = f"ID at index {index}: {exc}"
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    if errors:
        raise InvalidIds(errors)
    return checked


def parse_payload(payload: str) -> list[int]:
    return validated(split_payload(payload), id_from_token)


def parse_json_ids(values: list) -> list[int]:
    return validated(values, id_from_json)
