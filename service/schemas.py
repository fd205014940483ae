"""Request and response shapes, with the original API's field names."""

from __future__ import annotations

from datetime import UTC

from flask import g, url_for
from marshmallow import Schema, ValidationError, fields, missing, validates_schema
from marshmallow.validate import Length, OneOf

from .ids import MAX_ID, InvalidIds, id_from_json, parse_json_ids, parse_payload
from .models import AssignmentStatus, Overflow, TaskStatus


class RowSchema(Schema):
    """A schema that dumps rows (ORM objects) at a fraction of marshmallow's cost.

    For each value marshmallow makes five calls to find it (serialize, get_value,
    get_attribute, get_value, _get_value_for_key), which for a page of rows cost more
    than the query. Here a field that reads an attribute the plain way gets it with one
    getattr, as marshmallow would for an object without item access, and converts it
    with its own _serialize. Fields that compute their value, values that are missing
    and objects with item access take marshmallow's own path. (So a subclass must not
    change get_attribute.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dump_plan = [
            (
                field.data_key if field.data_key is not None else name,
                name,
                _plain_attribute(name, field),
                field,
            )
            for name, field in self.dump_fields.items()
        ]

    def _serialize(self, obj, *, many=False):
        if many and obj is not None:
            return [self._serialize(item) for item in obj]
        if hasattr(obj, "__getitem__"):
            return super()._serialize(obj)
        dumped = {}
        for key, name, attribute, field in self._dump_plan:
            value = getattr(obj, attribute, missing) if attribute else missing
            if value is missing:
                value = field.serialize(name, obj, accessor=self.get_attribute)
                if value is missing:
                    continue
            else:
                value = field._serialize(value, name, obj)
            dumped[key] = value
        return dumped


def _plain_attribute(name: str, field: fields.Field) -> str | None:
    """The attribute that a field reads the plain way; None for any other field."""
    kind = type(field)
    attribute = field.attribute or name
    plain = (
        field._CHECK_ATTRIBUTE
        and kind.serialize is fields.Field.serialize
        and kind.get_value is fields.Field.get_value
        and "." not in attribute
    )
    return attribute if plain else None


class _Text(fields.String):
    """Text that PostgreSQL can store: no NUL character, no lone UTF-16 surrogate."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("must not contain a NUL character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("must be valid Unicode (it holds a lone surrogate)") from None
        return text


def _name() -> _Text:
    return _Text(required=True, validate=Length(min=1, max=255))


class _UserId(fields.Integer):
    """One user ID: a JSON integer from 1 to 2**63 - 1, never a bool, float or string."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return id_from_json(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class _IdList(fields.Field):
    """A JSON list of user IDs; errors are keyed by the index of each bad one."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("must be a list of integers")
        try:
            return parse_json_ids(value)
        except InvalidIds as exc:
            raise ValidationError({str(i): [m] for i, m in exc.errors.items()}) from None


class _Payload(fields.String):
    """The original form: IDs in one string, separated by commas or whitespace."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_payload(text)
        except InvalidIds as exc:
            raise ValidationError(list(exc.errors.values())) from None


class UserSchema(RowSchema):
    id = _UserId()
    name = _name()
    date_created = fields.DateTime(dump_only=True)
    last_processed_at = fields.DateTime(dump_only=True, allow_none=True)
    times_processed = fields.Integer(dump_only=True)


class UserUpdateSchema(UserSchema):
    class Meta:
        exclude = ("id",)


class TaskSubmitSchema(Schema):
    """A task's IDs come as `payload` (a string) or `ids` (a list), never both."""

    task_name = _name()
    payload = _Payload(metadata={"description": "IDs as a string: '1,2,3'"})
    ids = _IdList(metadata={"description": "IDs as a list: [1, 2, 3]"})
    overflow = fields.String(validate=OneOf(list(Overflow)))

    @validates_schema
    def _one_id_source(self, data, partial=None, **kwargs):
        given = [name for name in ("payload", "ids") if name in data]
        if len(given) > 1:
            raise ValidationError("give either payload or ids, not both", "ids")
        if not given and not partial:
            raise ValidationError("give the IDs as payload or as ids", "ids")
        if given and not data[given[0]]:
            raise ValidationError("the list of IDs is empty", given[0])


class TaskSummarySchema(RowSchema):
    """A task in a list: every field but `payload`, so that a page stays small."""

    id = fields.Integer()
    task_name = fields.String()
    task_status = fields.Boolean(metadata={"description": "true once the task has finished"})
    date_created = fields.DateTime()
    status = fields.String(metadata={"enum": list(TaskStatus)})
    overflow = fields.String()
    total = fields.Integer()
    duplicates = fields.Integer()
    planned = fields.Integer()
    done = fields.Integer()
    failed = fields.Integer()
    pending = fields.Integer()
    first_slot = fields.DateTime(allow_none=True)
    last_slot = fields.DateTime(allow_none=True)
    ids_url = fields.Method("_ids_url")

    def _ids_url(self, task) -> str:
        before, after = _ids_url_around_the_id()
        return f"{before}{task.id}{after}"


def _ids_url_around_the_id() -> tuple[str, str]:
    """A task's /ids/ URL split where the task's id goes.

    url_for takes a third of the time it takes to dump a task; asked once per request,
    with a stand-in id, it serves a whole page of tasks.
    """
    around = g.get("ids_url_around_the_id")
    if around is None:
        link = url_for("tasks.TaskIds", task_id=MAX_ID, _external=True)
        around = g.ids_url_around_the_id = tuple(link.split(str(MAX_ID)))
    return around


class TaskSchema(TaskSummarySchema):
    payload = fields.String(
        allow_none=True,
        metadata={"description": "the IDs as submitted, for small tasks; else read /ids/"},
    )


class TaskAcceptedSchema(TaskSchema):
    message = fields.Constant("Task added to queue")
    task_id = fields.Function(lambda task: task.id, metadata={"type": "integer"})


class TaskIdSchema(Schema):
    position = fields.Integer()
    id = fields.Integer(attribute="user_id")
    slot = fields.DateTime(allow_none=True)
    status = fields.String()
    attempts = fields.Integer()
    error = fields.String(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


class TextSubmitQuerySchema(Schema):
    """Query of a POST whose body is IDs as text (text/csv or text/plain)."""

    task_name = _name()
    overflow = fields.String(validate=OneOf(list(Overflow)))


ID_STATUSES = ("received", *AssignmentStatus)


def _moment(description: str, **kwargs) -> fields.AwareDateTime:
    """A moment in a query: ISO 8601, UTC when it names no zone, in a sane range of years
    (near year 1 or 9999 the arithmetic of windows would leave what datetime can hold)."""
    return fields.AwareDateTime(
        default_timezone=UTC,
        validate=_plausible_year,
        metadata={"description": description},
        **kwargs,
    )


def _plausible_year(moment) -> None:
    if not 1970 <= moment.year <= 9000:
        raise ValidationError("must fall between the years 1970 and 9000")


class TaskIdsQuerySchema(Schema):
    status = fields.String(validate=OneOf(ID_STATUSES))
    slot = _moment("only the IDs of the slot starting then")


class SlotsQuerySchema(Schema):
    start = _moment("first moment shown (default: the current window's start)", data_key="from")
    end = _moment("end, exclusive (default: four windows after the start)", data_key="to")


class SlotSchema(Schema):
    start = fields.AwareDateTime()
    load = fields.Integer()
    capacity = fields.Integer()
    done = fields.Integer()
    failed = fields.Integer()
    open = fields.Boolean(metadata={"description": "still taking new IDs"})
    started_at = fields.AwareDateTime(
        allow_none=True, metadata={"description": "when its first ID was claimed"}
    )
    late = fields.Boolean(metadata={"description": "it ran after its time"})


class WindowSchema(Schema):
    start = fields.AwareDateTime()
    end = fields.AwareDateTime()
    load = fields.Integer()
    capacity = fields.Integer()
    slots = fields.List(fields.Nested(SlotSchema))


class PlanSchema(Schema):
    rpm = fields.Integer()
    slot_seconds = fields.Integer()
    window_slots = fields.Integer()
    now = fields.AwareDateTime()
    windows = fields.List(fields.Nested(WindowSchema))
