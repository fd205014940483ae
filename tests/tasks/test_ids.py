import pytest

from service.tasks.ids import MAX_ID, InvalidIds, parse_json_ids, parse_payload, split_payload


def test_payload_accepts_commas_spaces_and_newlines():
    assert parse_payload("1,2, 3\n4\t5,") == [1, 2, 3, 4, 5]


def test_empty_entries_between_separators_are_skipped():
    assert split_payload(",,1,,2,") == ["1", "2"]


def test_largest_64_bit_id_is_accepted():
    assert parse_payload(str(MAX_ID)) == [MAX_ID]
    assert parse_json_ids([MAX_ID]) == [MAX_ID]


@pytest.mark.parametrize(
    ("payload", "index", "reason"),
    [
        ("1,abc", 1, "not a positive integer"),
        ("1,2,-3", 2, "not a positive integer"),
        ("0", 0, "at least 1"),
        ("1.5", 0, "not a positive integer"),
        (str(MAX_ID + 1), 0, "beyond 64 bits"),
        ("9" * 5000, 0, "beyond 64 bits"),
        ("١٢", 0, "not a positive integer"),  # digits, but not ASCII ones
    ],
)
def test_each_bad_token_is_named_with_its_index(payload, index, reason):
    with pytest.raises(InvalidIds) as caught:
        parse_payload(payload)
    assert list(caught.value.errors) == [index]
    assert reason in caught.value.errors[index]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("7", "a string"),
        (7.0, "a float"),
        (True, "a boolean"),
        (None, "not a number"),
        (0, "at least 1"),
        (-1, "at least 1"),
        (MAX_ID + 1, "beyond 64 bits"),
    ],
)
def test_json_ids_must_be_true_integers_in_range(value, reason):
    with pytest.raises(InvalidIds) as caught:
        parse_json_ids([1, value])
    assert reason in caught.value.errors[1]


def test_error_list_is_capped_to_stay_readable():
    with pytest.raises(InvalidIds) as caught:
        parse_json_ids(["x"] * 1000)
    assert len(caught.value.errors) == 20
