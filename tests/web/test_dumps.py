"""The read path's shortcuts answer exactly what marshmallow and flask-smorest would."""

from datetime import UTC, datetime

from flask_smorest import Blueprint
from marshmallow import Schema, fields

from service.core.models import IdTask, TaskStatus, User
from service.web.base import ServiceBlueprint
from service.web.schemas import (
    RowSchema,
    TaskAcceptedSchema,
    TaskSchema,
    TaskSummarySchema,
    UserSchema,
)

MOMENT = datetime(2026, 1, 5, 9, 0, 30, 123456, tzinfo=UTC)


def marshmallow_dump(schema: Schema, obj) -> dict:
    return Schema._serialize(schema, obj)


def rows():
    user = User(id=7, name="Ada", date_created=MOMENT, last_processed_at=None, times_processed=2)
    task = IdTask(
        id=3,
        task_name="t",
        overflow="spread",
        status=TaskStatus.CANCELLED,
        payload="1,2",
        total=2,
        duplicates=1,
        planned=2,
        done=1,
        failed=0,
        first_slot=MOMENT,
        last_slot=None,
        date_created=MOMENT,
    )
    return user, task


def test_rows_dump_as_marshmallow_dumps_them(app):
    user, task = rows()
    cases = [(UserSchema(), user)]
    cases += [(schema(), task) for schema in (TaskSummarySchema, TaskSchema, TaskAcceptedSchema)]
    with app.test_request_context():
        for schema, row in cases:
            assert schema.dump(row) == marshmallow_dump(schema, row)
            assert schema.dump([row, row], many=True) == [marshmallow_dump(schema, row)] * 2


class Odd:
    """An object whose fields take every path: renamed, missing, computed."""

    plain = 1
    renamed_source = "r"


class OddSchema(RowSchema):
    plain = fields.Integer()
    renamed = fields.String(attribute="renamed_source", data_key="shown_as")
    absent = fields.Integer()
    absent_with_default = fields.Integer(dump_default=5)
    computed = fields.Function(lambda obj: 2)
    mapping_only = fields.Integer()


def test_fields_off_the_plain_path_dump_as_marshmallow_dumps_them():
    schema = OddSchema()
    assert schema.dump(Odd()) == marshmallow_dump(schema, Odd())
    expected = {"plain": 1, "shown_as": "r", "absent_with_default": 5, "computed": 2}
    assert schema.dump(Odd()) == expected
    as_dict = {"plain": 3, "mapping_only": 4}
    assert schema.dump(as_dict) == marshmallow_dump(schema, as_dict)


def test_the_pagination_header_is_flask_smorest_s():
    for item_count in (0, 1, 9, 10, 11, 95):
        for page_size in (1, 10, 100):
            for page in (1, 2, 3, 10, 11, 12):
                ours = ServiceBlueprint._make_pagination_metadata(page, page_size, item_count)
                theirs = Blueprint._make_pagination_metadata(page, page_size, item_count)
                assert ours == theirs and list(ours) == list(theirs)
