"""Validation of submitted user IDs: positive integers that fit in 64 bits.

However they come (a JSON list, a string of them, a text body), the IDs are read into an
array of 64-bit integers (8 bytes an ID) or streamed, never into a list of Python ints
(about 36 bytes an ID).
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from service.core.models import MAX_ID

_MAX_DIGITS = len(str(MAX_ID))
# Errors name at most this many bad entries: enough to fix a file, short enough to read.
MAX_REPORTED_ERRORS = 20
# Commas and ASCII whitespace, the same for a JSON payload and a streamed text body.
SEPARATOR = r"[, \t\n\r\f\v]"
# Past this, a token cannot be an ID, however many leading zeros it has.
MAX_TOKEN_BYTES = 4096
# A header longer than this is no header a person wrote: it is read as IDs.
MAX_HEADER_BYTES = 4096
# How much of a bad token or of a skipped header an answer shows.
SHOWN_CHARS = 40

# One wording per kind of mistake, whatever the body it came in: `-5` reads the same in a
# CSV file, in a payload string and in a JSON list.
NOT_A_NUMBER = "not a number in the digits 0-9"
NOT_AN_INTEGER = "has a decimal point or an exponent: an ID is an integer"
BELOW_ONE = "less than 1: IDs start at 1"
BEYOND_64_BITS = f"beyond 64 bits: the largest ID is {MAX_ID}"
A_STRING = "a string: an ID in a JSON list is a number, without quotes"
A_BOOLEAN = "a boolean, not a number"
TOO_LONG = f"longer than {MAX_TOKEN_BYTES} bytes: no ID is"


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
_IDS = f"{SEPARATOR}*{_ID_TOKEN}(?:{SEPARATOR}+{_ID_TOKEN})*{SEPARATOR}*"
# What a payload string holds, for the OpenAPI document: the same rule as the parsers
# below, so a generated client sends nothing they refuse.
IDS_TEXT_PATTERN = f"^{_IDS}$"
# A text body's first line with no digit but something besides separators is a header.
_HEADER_LINE = r"[^0-9\n]*[^0-9\n, \t\r\f\v][^0-9\n]*\n"
# What a text body holds: the same IDs, after a UTF-8 byte order mark and a header line
# if it has them.
IDS_BODY_PATTERN = f"^\ufeff?(?:{_HEADER_LINE})?{_IDS}$"


@dataclass(frozen=True)
class BadId:
    """One refused ID: where it is (`index` in a JSON list, 0-based as JSON arrays are;
    or `line` and `column` in text, 1-based as editors count), the token as sent and the
    reason."""

    token: str
    reason: str
    index: int | None = None
    line: int | None = None
    column: int | None = None

    def where(self) -> str:
        if self.index is not None:
            return f"index {self.index}"
        return f"line {self.line}, column {self.column}"

    def __str__(self) -> str:
        return f"{self.where()}, {self.token!r}: {self.reason}"

    def as_dict(self) -> dict:
        if self.index is not None:
            place = {"index": self.index}
        else:
            place = {"line": self.line, "column": self.column}
        return {**place, "token": self.token, "reason": self.reason}


class InvalidIds(ValueError):
    """Some IDs are malformed: `listed` holds the first MAX_REPORTED_ERRORS of them in
    order, `invalid` counts them all, of the `submitted` IDs."""

    def __init__(self, listed: list[BadId], invalid: int, submitted: int):
        super().__init__(how_many_invalid(invalid, submitted))
        self.listed = listed
        self.invalid = invalid
        self.submitted = submitted

    def details(self) -> dict:
        return {
            "invalid": self.invalid,
            "submitted": self.submitted,
            "listed": [bad.as_dict() for bad in self.listed],
        }


def how_many_invalid(invalid: int, submitted: int) -> str:
    return f"{invalid} of the {submitted} IDs {'is' if invalid == 1 else 'are'} invalid"


def json_id_error(value: object) -> str | None:
    """Why a JSON value is no ID, or None when it is one."""
    # bool is an int subclass, and a float or a string is an integer only by accident.
    if type(value) is int:
        return BELOW_ONE if value < 1 else BEYOND_64_BITS if value > MAX_ID else None
    if type(value) is float:
        return NOT_AN_INTEGER
    return {bool: A_BOOLEAN, str: A_STRING}.get(type(value), NOT_A_NUMBER)


def id_from_json(value: object) -> int:
    """Check one JSON value, raising ValueError with the reason."""
    reason = json_id_error(value)
    if reason is not None:
        raise ValueError(reason)
    return value


def parse_json_ids(values: list) -> list[int]:
    """The IDs of a JSON list; InvalidIds names each bad one by its index (0-based).

    An item may be CHECKED_ID: an ID that load_json_with_ids found, in a list with bad
    ones (a list of IDs only, it gives as an array)."""
    listed: list[BadId] = []
    invalid = 0
    for index, value in enumerate(values):
        if value is CHECKED_ID:
            continue
        reason = json_id_error(value)
        if reason is None:
            continue
        invalid += 1
        if len(listed) < MAX_REPORTED_ERRORS:
            listed.append(BadId(_json_token(value), reason, index=index))
    if invalid:
        raise InvalidIds(listed, invalid, len(values))
    return values


def _json_token(value: object) -> str:
    # A list or an object is shown by its kind: dumping all of it would only be cut.
    if isinstance(value, list):
        return "[...]"
    if isinstance(value, dict):
        return "{...}"
    return _shown(json.dumps(value))


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


class _CheckedId:
    """What load_json_with_ids leaves in a document for an integer that is an ID: the
    value itself is in the document's array of IDs."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<ID>"


CHECKED_ID = _CheckedId()


def load_json_with_ids(text: str) -> object:
    """The JSON document `text` as json.loads reads it, with the same errors, except that
    its top-level `ids`, when a list of IDs only, comes as an array of 64-bit integers.

    A body of a million IDs would be a million Python ints in a list (36 bytes an ID),
    which the array holds in 8. json.loads hands each integer to a hook that keeps an ID
    in the array and puts CHECKED_ID in its place (the list then holds the same object
    everywhere: 8 bytes an item); any other integer stays as it was. Every other value
    is as json.loads makes it, so that a field that refuses an integer (a name, say)
    refuses CHECKED_ID with the same words.
    """
    return _IdsInJson().load(text)


class _IdsInJson:
    """The array of every ID of a document, in document order, and how to find the run of
    it that is the top-level `ids` list."""

    def __init__(self):
        self._ids = array("q")
        # Objects that named a key twice, by id(), with all their (key, value) pairs:
        # json.loads keeps the last value, but the IDs of the others are in the array too.
        self._repeated: dict[int, tuple[dict, list]] = {}

    def load(self, text: str) -> object:
        document = json.loads(text, parse_int=self._integer, object_pairs_hook=self._object)
        if isinstance(document, dict) and type(document.get("ids")) is list:
            document["ids"] = self._top_level_ids(document)
        return document

    def _integer(self, digits: str) -> object:
        value = int(digits)  # too many digits: the ValueError json.loads would raise
        if 1 <= value <= MAX_ID:
            self._ids.append(value)
            return CHECKED_ID
        return value

    def _object(self, pairs: list) -> dict:
        made = dict(pairs)
        if len(made) < len(pairs):
            self._repeated[id(made)] = (made, pairs)
        return made

    def _pairs(self, made: dict) -> list:
        repeated = self._repeated.get(id(made))
        return repeated[1] if repeated else list(made.items())

    def _top_level_ids(self, document: dict) -> array | list:
        items = document["ids"]
        if items.count(CHECKED_ID) < len(items):
            return items  # some are no IDs: parse_json_ids names them
        pairs = self._pairs(document)
        last = max(index for index, (key, _) in enumerate(pairs) if key == "ids")
        start = sum(self._ids_in(value) for _, value in pairs[:last])
        if start == 0 and len(items) == len(self._ids):
            return self._ids
        return self._ids[start : start + len(items)]

    def _ids_in(self, value: object) -> int:
        """How many IDs of the array `value` holds, however deep."""
        count, stack = 0, [value]
        while stack:
            item = stack.pop()
            if item is CHECKED_ID:
                count += 1
            elif type(item) is list:
                count += item.count(CHECKED_ID)
                stack.extend(inner for inner in item if type(inner) in (list, dict))
            elif type(item) is dict:
                stack.extend(inner for _, inner in self._pairs(item))
        return count


def parse_payload(payload: str) -> array:
    """The IDs of a string, read as a text body is (lines and columns included)."""
    return array("q", stream_ids(_EncodedText(payload)))


class _EncodedText:
    """A string read as its UTF-8 bytes, a block at a time: never all of it encoded."""

    def __init__(self, text: str):
        self._text = text
        self._at = 0

    def read(self, size: int) -> bytes:
        block = self._text[self._at : self._at + size]
        self._at += len(block)
        # A lone surrogate passes as its three bytes: one character, refused with its
        # token. No block ends inside a character: a str holds whole code points.
        return block.encode("utf-8", "surrogatepass")


def stream_ids(stream: BinaryIO, header: bool | None = False, read_size: int = 1 << 16) -> IdStream:
    """The IDs of a text body read block by block, never holding all of it.

    `header`: True skips the first line; None skips it when it holds no digit (and is at
    most MAX_HEADER_BYTES long); False reads every line as IDs.
    """
    return IdStream(stream, header, read_size)


_BYTE_SEPARATORS = re.compile(rb"[, \t\n\r\f\v]+")
_BYTE_TOKENS = re.compile(rb"[^, \t\n\r\f\v]+")
_DIGIT = re.compile(rb"[0-9]")
_MAX_ID_BYTES = str(MAX_ID).encode()


class IdStream:
    """An iterable over a text body's IDs: separated by commas and/or whitespace, lines
    ending with a newline. Bad tokens are counted to the end of the body and the first
    ones kept with their line and column; then InvalidIds is raised, so a consumer
    writing to the database inside a transaction stores nothing. Once read,
    `header_skipped` holds the header line skipped, if one was."""

    def __init__(self, stream: BinaryIO, header: bool | None, read_size: int):
        self._stream = stream
        self._header = header
        self._read_size = read_size
        self.header_skipped: str | None = None

    def __iter__(self) -> Iterator[int]:
        scan = _Scan()
        pending, ended = self._beginning(scan)
        while True:
            pending = yield from scan.tokens(pending, final=ended)
            if ended:
                break
            block = self._read()
            ended = not block
            pending += block
        scan.check()

    def _read(self) -> bytes:
        return self._stream.read(self._read_size)

    def _beginning(self, scan: _Scan) -> tuple[bytes, bool]:
        """The body's first bytes without a byte order mark and a header, if it has them;
        and whether the body has ended."""
        start, ended = b"", False
        # Enough to see the first line whole, when it is short enough to be a header.
        while not ended and len(start) <= MAX_HEADER_BYTES:
            block = self._read()
            ended = not block
            start += block
            if b"\n" in block:
                break
        start = start.removeprefix(codecs.BOM_UTF8)
        line_end = start.find(b"\n")
        first_line = start if line_end < 0 else start[:line_end]
        if self._header is None and 0 <= line_end <= MAX_HEADER_BYTES:
            skip = _is_header(first_line)
        else:
            skip = self._header is True
        if not skip:
            return start, ended
        self.header_skipped = _shown(first_line.decode("utf-8", "replace").strip())
        scan.next_line()
        if line_end >= 0:
            return start[line_end + 1 :], ended
        return self._after_the_first_line(ended)

    def _after_the_first_line(self, ended: bool) -> tuple[bytes, bool]:
        """Skip the rest of a first line too long to have been read whole."""
        while not ended:
            block = self._read()
            ended = not block
            line_end = block.find(b"\n")
            if line_end >= 0:
                return block[line_end + 1 :], ended
        return b"", True


def _is_header(line: bytes) -> bool:
    return _DIGIT.search(line) is None and _BYTE_TOKENS.search(line) is not None


class _Scan:
    """The tokens of a body in order: IDs yielded, bad tokens counted and the first ones
    placed. The position kept is the line and the characters before the data not yet
    scanned, so that placing a token costs a look at its own block only."""

    def __init__(self):
        self.line = 1
        self.column = 0
        self.listed: list[BadId] = []
        self.invalid = 0
        self.submitted = 0
        self._skipping = False

    def next_line(self) -> None:
        self.line += 1
        self.column = 0

    def tokens(self, data: bytes, final: bool) -> Iterator[int]:
        """Yield the IDs of `data`; return what may be the start of a token that the
        next block ends (nothing when `final`)."""
        if self._skipping:
            data = self._skip_rest_of_token(data)
        pieces = _BYTE_SEPARATORS.split(data)
        # A block may end inside a token: keep the last piece for the next block.
        tail = b"" if final else pieces.pop()
        # Only the first piece and the last can be empty (data starting or ending with a
        # separator), so a piece's index, less one after an empty first piece, is its
        # place among the tokens; nothing is counted per token but the bad ones.
        leading = 1 if pieces and not pieces[0] else 0
        to_place = []
        for index, token in enumerate(pieces):
            if _is_valid_id(token):
                yield int(token)
            elif token:
                self.invalid += 1
                if len(self.listed) + len(to_place) < MAX_REPORTED_ERRORS:
                    to_place.append(index - leading)
        self.submitted += len(pieces) - pieces.count(b"")
        self._place(data, to_place)
        scanned = len(data) - len(tail)
        if len(tail) > MAX_TOKEN_BYTES:
            self._too_long(data, scanned)
            scanned, tail = len(data), b""
        self._advance(data[:scanned])
        return tail

    def check(self) -> None:
        if self.invalid:
            raise InvalidIds(self.listed, self.invalid, self.submitted)

    def _place(self, data: bytes, ordinals: list[int]) -> None:
        """List the bad tokens of `data` that are its ordinals-th tokens."""
        if not ordinals:
            return
        wanted = iter(ordinals)
        target = next(wanted)
        for ordinal, match in enumerate(_BYTE_TOKENS.finditer(data)):
            if ordinal == target:
                token = match.group()
                self.listed.append(self._bad(data, match.start(), token, _text_error(token)))
                target = next(wanted, None)
                if target is None:
                    return

    def _bad(self, data: bytes, offset: int, token: bytes, reason: str) -> BadId:
        line_break = data.rfind(b"\n", 0, offset)
        if line_break < 0:
            line, column = self.line, self.column + _chars(data[:offset])
        else:
            line = self.line + data.count(b"\n", 0, offset)
            column = _chars(data[line_break + 1 : offset])
        # Enough bytes for one character more than is shown, however wide they are.
        shown = _shown(token[: 4 * (SHOWN_CHARS + 1)].decode("utf-8", "replace"))
        return BadId(shown, reason, line=line, column=column + 1)

    def _too_long(self, data: bytes, offset: int) -> None:
        """A token past MAX_TOKEN_BYTES is refused at once, and the rest of it skipped,
        so that no block holds more than its length of it."""
        self.submitted += 1
        self.invalid += 1
        if len(self.listed) < MAX_REPORTED_ERRORS:
            self.listed.append(self._bad(data, offset, data[offset:], TOO_LONG))
        self._skipping = True

    def _skip_rest_of_token(self, data: bytes) -> bytes:
        end = _BYTE_SEPARATORS.search(data)
        if end is None:
            self._advance(data)
            return b""
        self._skipping = False
        self._advance(data[: end.start()])
        return data[end.start() :]

    def _advance(self, scanned: bytes) -> None:
        newlines = scanned.count(b"\n")
        if newlines:
            self.line += newlines
            self.column = _chars(scanned[scanned.rfind(b"\n") + 1 :])
        else:
            self.column += _chars(scanned)


# UTF-8's continuation bytes: what remains of a text once they are deleted is one byte
# per character.
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))


def _chars(text: bytes) -> int:
    """Characters in UTF-8 text: a column counts characters, as an editor does."""
    if text.isascii():
        return len(text)
    return len(text.translate(None, _CONTINUATION_BYTES))


def _is_valid_id(token: bytes) -> bool:
    if not token.isdigit():  # bytes.isdigit accepts ASCII digits only
        return False
    digits = token.lstrip(b"0")
    if not digits:
        return False
    return len(digits) < len(_MAX_ID_BYTES) or (
        len(digits) == len(_MAX_ID_BYTES) and digits <= _MAX_ID_BYTES
    )


_NEGATIVE = re.compile(rb"-[0-9]+")
_DECIMAL = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _text_error(token: bytes) -> str:
    """Why a token of text is no ID, in the words a JSON value gets for the same mistake."""
    if len(token) > MAX_TOKEN_BYTES:
        return TOO_LONG
    if token.isdigit():
        return BEYOND_64_BITS if token.strip(b"0") else BELOW_ONE
    if _NEGATIVE.fullmatch(token):
        return BELOW_ONE
    if _DECIMAL.fullmatch(token) and (b"." in token or b"e" in token.lower()):
        return NOT_AN_INTEGER
    return NOT_A_NUMBER
