import io
import json
import tracemalloc
from array import array

import pytest

from service.tasks.ids import (
    A_BOOLEAN,
    A_STRING,
    BELOW_ONE,
    BEYOND_64_BITS,
    CHECKED_ID,
    MAX_ID,
    NOT_A_NUMBER,
    NOT_AN_INTEGER,
    TOO_LONG,
    InvalidIds,
    load_json_with_ids,
    parse_json_ids,
    parse_payload,
    stream_ids,
)


def test_payload_accepts_commas_spaces_and_newlines():
    assert parse_payload("1,2, 3\n4\t5,") == array("q", [1, 2, 3, 4, 5])


def test_empty_entries_between_separators_are_skipped():
    assert parse_payload(",,1,,2,") == array("q", [1, 2])


def test_largest_64_bit_id_is_accepted():
    assert parse_payload(str(MAX_ID)) == array("q", [MAX_ID])
    assert parse_json_ids([MAX_ID]) == [MAX_ID]


@pytest.mark.parametrize(
    ("payload", "column", "reason"),
    [
        ("1,abc", 3, NOT_A_NUMBER),
        ("1,2,-3", 5, BELOW_ONE),
        ("0", 1, BELOW_ONE),
        ("1.5", 1, NOT_AN_INTEGER),
        (str(MAX_ID + 1), 1, BEYOND_64_BITS),
        ("9" * 5000, 1, TOO_LONG),
        ("١٢", 1, NOT_A_NUMBER),  # digits, but not ASCII ones
    ],
)
def test_each_bad_token_is_named_with_its_line_and_column(payload, column, reason):
    with pytest.raises(InvalidIds) as caught:
        parse_payload(payload)
    assert [(bad.line, bad.column) for bad in caught.value.listed] == [(1, column)]
    assert caught.value.listed[0].reason == reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("7", A_STRING),
        (7.0, NOT_AN_INTEGER),
        (True, A_BOOLEAN),
        (None, NOT_A_NUMBER),
        (0, BELOW_ONE),
        (-1, BELOW_ONE),
        (MAX_ID + 1, BEYOND_64_BITS),
    ],
)
def test_json_ids_must_be_true_integers_in_range(value, reason):
    with pytest.raises(InvalidIds) as caught:
        parse_json_ids([1, value])
    assert [(bad.index, bad.reason) for bad in caught.value.listed] == [(1, reason)]


def test_error_list_is_capped_to_stay_readable():
    with pytest.raises(InvalidIds) as caught:
        parse_json_ids(["x"] * 1000)
    assert len(caught.value.listed) == 20
    assert (caught.value.invalid, caught.value.submitted) == (1000, 1000)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-5, BELOW_ONE),
        (0, BELOW_ONE),
        (1.5, NOT_AN_INTEGER),
        (2**63, BEYOND_64_BITS),
        (-(2**70), BELOW_ONE),
        (1e5, NOT_AN_INTEGER),
    ],
)
def test_the_same_mistake_reads_the_same_in_json_and_in_text(value, reason):
    with pytest.raises(InvalidIds) as in_json:
        parse_json_ids([value])
    with pytest.raises(InvalidIds) as in_text:
        list(stream_ids(io.BytesIO(f"1\n{value}".encode())))
    assert in_json.value.listed[0].reason == in_text.value.listed[0].reason == reason
    assert in_json.value.listed[0].token == in_text.value.listed[0].token


def bad_places(body: bytes, **options) -> list[tuple[int, int, str]]:
    with pytest.raises(InvalidIds) as caught:
        list(stream_ids(io.BytesIO(body), **options))
    return [(bad.line, bad.column, bad.token) for bad in caught.value.listed]


def test_lines_and_columns_are_the_same_whatever_the_blocks():
    body = b"1,2,3\r\n4, 5a ,6\n\n  x\t7,,y\n" + b"8 " * 3000 + b"z"
    expected = [(2, 4, "5a"), (4, 3, "x"), (4, 8, "y"), (5, 6001, "z")]
    for read_size in (1, 2, 3, 7, 64, 1 << 16):
        assert bad_places(body, read_size=read_size) == expected, read_size


def test_a_column_counts_characters_not_bytes():
    assert bad_places("é,1,ü2,ß\n€x".encode()) == [
        (1, 1, "é"),
        (1, 5, "ü2"),
        (1, 8, "ß"),
        (2, 1, "€x"),
    ]


def test_a_token_too_long_is_refused_and_counting_goes_on():
    body = b"1," + b"9" * 10_000 + b",x\n2,y"
    with pytest.raises(InvalidIds) as caught:
        list(stream_ids(io.BytesIO(body), read_size=1000))
    assert [(bad.line, bad.column, bad.reason) for bad in caught.value.listed] == [
        (1, 3, TOO_LONG),
        (1, 10_004, NOT_A_NUMBER),
        (2, 3, NOT_A_NUMBER),
    ]
    assert (caught.value.invalid, caught.value.submitted) == (3, 5)


def test_past_the_listed_ones_every_bad_id_is_counted_in_order():
    body = b"\n".join(b"1,x%d" % n for n in range(5000))
    with pytest.raises(InvalidIds) as caught:
        list(stream_ids(io.BytesIO(body), read_size=100))
    assert [(bad.line, bad.token) for bad in caught.value.listed] == [
        (n + 1, f"x{n}") for n in range(20)
    ]
    assert (caught.value.invalid, caught.value.submitted) == (5000, 10_000)


class _Lines(io.RawIOBase):
    """`count` lines of a good ID and a bad one, made as they are read."""

    LINE = b"12345678,x\n"

    def __init__(self, count: int):
        self.left = count

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        lines = min(len(buffer) // len(self.LINE), self.left)
        chunk = self.LINE * lines
        buffer[: len(chunk)] = chunk
        self.left -= lines
        return len(chunk)


def test_counting_lines_and_columns_keeps_the_stream_in_flat_memory():
    tracemalloc.start()
    try:
        with pytest.raises(InvalidIds) as caught:
            for _ in stream_ids(io.BufferedReader(_Lines(300_000))):
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (caught.value.invalid, caught.value.submitted) == (300_000, 600_000)
    assert [(bad.line, bad.column) for bad in caught.value.listed] == [
        (line, 10) for line in range(1, 21)
    ]
    # 3.3 MB went through; a few blocks' worth stayed at most.
    assert peak < 1_000_000


@pytest.mark.parametrize(
    ("body", "header", "ids", "skipped"),
    [
        (b"user_id\n1\n2", None, [1, 2], "user_id"),
        (b"\xef\xbb\xbfUser ID\r\n1\r\n2\r\n", None, [1, 2], "User ID"),
        (b"1\n2", None, [1, 2], None),
        (b"id2024\n1\n2", True, [1, 2], "id2024"),
        (b"1,2\n3", True, [3], "1,2"),
        (b"h" * 10_000 + b"\n5", True, [5], "h" * 40 + "..."),
        (b" , \n1", None, [1], None),
    ],
)
def test_a_header_line_is_skipped_and_named(body, header, ids, skipped):
    for read_size in (1, 5, 1 << 16):
        stream = stream_ids(io.BytesIO(body), header=header, read_size=read_size)
        assert (list(stream), stream.header_skipped) == (ids, skipped)


def test_a_first_line_of_digits_and_letters_is_no_header():
    assert bad_places(b"user_1\n1\n2", header=None) == [(1, 1, "user_1")]
    assert bad_places(b"user_id\n1\n2") == [(1, 1, "user_id")]
    assert bad_places(b"user_id\n1\nx", header=None) == [(3, 1, "x")]


def test_the_ids_of_a_json_document_come_as_an_array_of_64_bit_integers():
    document = load_json_with_ids(
        f'{{"task_name": "t", "ids": [1, 20, 1, {MAX_ID}], "overflow": "defer"}}'
    )
    assert type(document["ids"]) is array
    assert document["ids"].typecode == "q"
    assert document == {
        "task_name": "t",
        "ids": array("q", [1, 20, 1, MAX_ID]),
        "overflow": "defer",
    }


def test_a_payload_comes_as_an_array_of_64_bit_integers_read_a_block_at_a_time():
    ids = list(range(10**9, 10**9 + 30_000))
    payload = "é," + ",".join(map(str, ids))  # the bad token first: columns count characters
    with pytest.raises(InvalidIds) as caught:
        parse_payload(payload)
    assert [(bad.column, bad.token) for bad in caught.value.listed] == [(1, "é")]
    assert parse_payload(payload[2:]) == array("q", ids)


def _as_loaded_with_ids(value: object, top: bool = True) -> object:
    """json.loads's document as load_json_with_ids gives it: its IDs stood in for by
    CHECKED_ID, the top-level `ids` an array when it holds nothing else."""
    if type(value) is int and 1 <= value <= MAX_ID:
        return CHECKED_ID
    if type(value) is list:
        return [_as_loaded_with_ids(item, False) for item in value]
    if type(value) is not dict:
        return value
    made = {key: _as_loaded_with_ids(item, False) for key, item in value.items()}
    ids = value.get("ids")
    if top and type(ids) is list:
        valid = all(_as_loaded_with_ids(item, False) is CHECKED_ID for item in ids)
        made["ids"] = array("q", ids) if valid else made["ids"]
    return made


JSON_DOCUMENTS = [
    '{"ids": []}',
    '{"ids": [1, 2, 3], "task_name": "t"}',
    '{"x": [5, {"y": 6, "y": [7]}, [8]], "ids": [9, 10]}',  # IDs before the list
    '{"ids": [1, 2], "task_name": 3, "ids": [4]}',  # the last of a key counts
    '{"a": {"b": [1, 2], "b": 3}, "ids": [4, 5]}',
    '{"ids": [1, [2, 3], 4]}',
    f'{{"ids": [1, -5, "2", true, 1.5, {MAX_ID + 1}, null, 0, -0, 1e5, NaN, {{"a": 1}}]}}',
    '{"ids": "1,2"}',
    '[1, 2, {"ids": [3]}]',
    f'{{"ids": [{2**70}]}}',
    "7",
    '{"task_name": "é\\ud800", "ids": [1]}',
]


@pytest.mark.parametrize("text", JSON_DOCUMENTS)
def test_a_json_document_reads_as_json_loads_reads_it(text):
    assert load_json_with_ids(text) == _as_loaded_with_ids(json.loads(text))


MALFORMED_JSON = [
    "",
    '{"task_name": ',
    '{"ids": [1, 2,]}',
    '{"ids": [1 2]}',
    '{"ids": [01]}',
    '{"ids": [1, 2]',
    '{"ids": [1, 2]} x',
    '{"ids": [1, "2\x01"]}',
    '{"ids": [' + "9" * 5000 + "]}",
    '{"ids": [1, 2, ' + "9" * 5000 + ", }",
    "\ufeff{}",
    "[" * 50_000,
]


@pytest.mark.parametrize("text", MALFORMED_JSON)
def test_malformed_json_is_refused_as_json_loads_refuses_it(text):
    with pytest.raises((ValueError, RecursionError)) as expected:
        json.loads(text)
    with pytest.raises(expected.type) as refused:
        load_json_with_ids(text)
    assert str(refused.value) == str(expected.value)
