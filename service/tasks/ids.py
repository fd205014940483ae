"""Validation of submitted user IDs: positive integers that fit in 64 bits."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from service.core.models import MAX_ID

_MAX_DIGITS = len(str(MAX_ID))
# Errors name at most this many bad entries: enough to fix a file, short enough to read.
MAX_REPORTED_ERRORS = 20
# Commas and ASCII whitespace, the same for a JSON payload and a streamed text body.
SEPARATOR = r"[, \t\n\r\f\v]"
_SEPARATORS = re.compile(SEPARATOR + "+")


def _numbers_up_to(limit: str) -> str:
    """A regular expression for the decimal numbers from 1 to `limit`, no leading zero:
    any shorter number, or one as long whose first differing digit is lower."""
    shorter = f"[1-9][0-9]{{0,{len(limit) - 2}}}"
    as_long = []
    for index, digit in enumerate(limit):
        lowest = 1 if index == 0 else 0
        if int(digit) > lowest:
            rest = len(limit) - index - 1
            as_long.append(f"{limit[:index]}[{lowest}-{int(digit) - 1}][0-9]{{{rest}}}")
    return "(?:" + "|".join([shorter, *as_long, limit]) + ")"


_ID_TOKEN = "0*" + _numbers_up_to(str(MAX_ID))
# What a payload string or a text body holds, for the OpenAPI document: the same rule as
# the parsers below, so a generated client sends nothing they refuse.
IDS_TEXT_PATTERN = f"^{SEPARATOR}*{_ID_TOKEN}(?:{SEPARATOR}+{_ID_TOKEN})*{SEPARATOR}*$"


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


_BYTE_SEPARATORS = re.compile(rb"[,\s]+")
_MAX_ID_BYTES = str(MAX_ID).encode()
# Past this, a token cannot be an ID, however many leading zeros it has.
_MAX_TOKEN_BYTES = 4096


def stream_ids(stream: BinaryIO, read_size: int = 1 << 16) -> Iterator[int]:
    """Yield the IDs of a text body read block by block, never holding all of it.

    IDs are separated by commas and/or whitespace. Bad tokens are collected with their
    index; once the body ends (or enough errors are seen) InvalidIds is raised, so a
    consumer writing to the database inside a transaction stores nothing.
    """
    errors: dict[int, str] = {}
    index = 0
    tail = b""
    while True:
        block = stream.read(read_size)
        tokens = _BYTE_SEPARATORS.split(tail + block)
        # A block may end inside a token: keep the last piece for the next block.
        tail = tokens.pop() if block else b""
        if len(tail) > _MAX_TOKEN_BYTES:
            errors[index + sum(1 for token in tokens if token)] = (
                f"a token longer than {_MAX_TOKEN_BYTES} bytes"
            )
            raise InvalidIds(errors)
        for token in tokens:
            if not token:
                continue
            if _is_valid_id(token):
                yield int(token)
            else:
                errors[index] = f"ID at index {index}: {_token_error(token)}"
                if len(errors) >= MAX_REPORTED_ERRORS:
                    raise InvalidIds(errors)
            index += 1
        if not block:
            break
    if errors:
        raise InvalidIds(errors)


def _is_valid_id(token: bytes) -> bool:
    if not token.isdigit():  # bytes.isdigit accepts ASCII digits only
        return False
    digits = token.lstrip(b"0")
    if not digits:
        return False
    return len(digits) < len(_MAX_ID_BYTES) or (
        len(digits) == len(_MAX_ID_BYTES) and digits <= _MAX_ID_BYTES
    )


def _token_error(token: bytes) -> str:
    text = token.decode("ascii", errors="replace")
    try:
        id_from_token(text)
    except ValueError as exc:
        return str(exc)
    return f"{text[:40]!r} is not a valid ID"
