"""Request and response shapes, with the original API's field names."""

from __future__ import annotations

from array import array
from datetime import UTC, datetime, timedelta

from flask import g, url_for
from flask_smorest import error_handler
from marshmallow import EXCLUDE, Schema, ValidationError, fields, missing, validates_schema
from marshmallow.validate import Length, OneOf, Range, Regexp

from service.core.models import AssignmentStatus, Overflow, TaskStatus
from service.limits.store import DEFAULT, DEFAULT_PROCESSOR
from service.tasks.ids import (
    IDS_TEXT_PATTERN,
    MAX_HEADER_BYTES,
    MAX_ID,
    MAX_REPORTED_ERRORS,
    SHOWN_CHARS,
    InvalidIds,
    id_from_json,
    parse_json_ids,
    parse_payload,
)

# Text that PostgreSQL can store, for the OpenAPI document (a lone surrogate is not JSON).
NO_NUL_PATTERN = "^[^\\u0000]*$"


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

    def __init__(self, **kwargs):
        metadata = {"pattern": NO_NUL_PATTERN, **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("must not contain a NUL character")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("must be valid Unicode (it holds a lone surrogate)") from None
        return text


def _name(**kwargs) -> _Text:
    return _Text(validate=Length(min=1, max=255), **kwargs)


# One user ID as the OpenAPI document states it.
ID_RANGE = {"type": "integer", "minimum": 1, "maximum": MAX_ID}


class _UserId(fields.Integer):
    """One user ID: a JSON integer from 1 to 2**63 - 1, never a bool, float or string."""

    def __init__(self, **kwargs):
        super().__init__(metadata=ID_RANGE, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return id_from_json(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class _JsonBoolean(fields.Boolean):
    """true or false as JSON has them; "yes", 1 or "true" in quotes are refused, as the
    OpenAPI document's boolean says."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class _IdList(fields.Field):
    """A JSON list of user IDs; each bad one is named by its index."""

    def __init__(self, **kwargs):
        metadata = {"type": "array", "items": ID_RANGE, "minItems": 1, **kwargs.pop("metadata")}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, array):
            return value  # IDs only, checked as the body was read (load_json_with_ids)
        if not isinstance(value, list):
            raise ValidationError("must be a list of integers")
        try:
            return parse_json_ids(value)
        except InvalidIds as exc:
            raise ValidationError(exc.details()) from None


class _Payload(fields.String):
    """The original form: IDs in one string, separated by commas or whitespace."""

    def __init__(self, **kwargs):
        metadata = {"pattern": IDS_TEXT_PATTERN, **kwargs.pop("metadata")}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_payload(text)
        except InvalidIds as exc:
            raise ValidationError(exc.details()) from None


def moment(description: str, **kwargs) -> fields.AwareDateTime:
    """A moment in a query: ISO 8601, UTC when it names no zone, in a sane range of years
    (near year 1 or 9999 the arithmetic of windows would leave what datetime can hold)."""
    return fields.AwareDateTime(
        default_timezone=UTC,
        validate=_plausible_year,
        metadata={"description": description, "pattern": PLAUSIBLE_YEAR_PATTERN},
        **kwargs,
    )


def _plausible_year(moment) -> None:
    if not 1970 <= moment.year <= 9000:
        raise ValidationError("must fall between the years 1970 and 9000")


# The same years, for the OpenAPI document: the year as written, as _plausible_year reads it.
PLAUSIBLE_YEAR_PATTERN = "^(19[7-9][0-9]|[2-8][0-9]{3}|9000)-"


# A task may ask to start at most this far ahead: a leap year's length, so that the same
# date next year always passes.
MAX_START_AHEAD = timedelta(days=366)
UNAWARE = "must name its time zone: Z or an offset such as +02:00"


def _within_a_year(moment) -> None:
    if moment > datetime.now(UTC) + MAX_START_AHEAD:
        raise ValidationError("must be at most a year ahead (366 days from now)")


NOT_BEFORE_DESCRIPTION = (
    "planning starts at the window holding this moment and never uses an earlier slot; "
    "ISO 8601 with a time zone, at most a year ahead (366 days after the request, which the "
    "server checks); a past moment means now"
)
# JSON Schema cannot say "a year from now", and a pattern drawn from the day the process
# started would refuse next year's dates in a client once that day has passed: the pattern
# states only the years any moment may have, the description the rest.
NOT_BEFORE_PATTERN = PLAUSIBLE_YEAR_PATTERN


def _not_before(description: str = NOT_BEFORE_DESCRIPTION, **kwargs) -> fields.AwareDateTime:
    """A task's start: an aware moment, at most a year ahead; a past one means now."""
    return fields.AwareDateTime(
        validate=[_plausible_year, _within_a_year],
        error_messages={"invalid_awareness": UNAWARE},
        metadata={"description": description, "pattern": NOT_BEFORE_PATTERN},
        **kwargs,
    )


# A limit's name: a slug, so that it reads well in paths, job ids and logs.
LIMIT_NAME_PATTERN = "^[a-z0-9]+(-[a-z0-9]+)*$"
MAX_LIMIT_NAME = 63
PROCESSOR_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
MAX_RPM = 2**31 - 1


def limit_name(description: str, **kwargs) -> fields.String:
    return fields.String(
        validate=[
            Length(min=1, max=MAX_LIMIT_NAME),
            Regexp(LIMIT_NAME_PATTERN, error="must be lower-case letters, digits and hyphens"),
        ],
        metadata={"description": description},
        **kwargs,
    )


PLANNED_UNDER = f"the limit it is planned under (default: {DEFAULT!r})"


def _naming_a_limit(description: str = PLANNED_UNDER, **kwargs) -> fields.String:
    return limit_name(description, **kwargs)


class UserSchema(RowSchema):
    """A user as answered; one first met as a processed ID has no name."""

    id = fields.Integer(metadata=ID_RANGE)
    name = fields.String(allow_none=True)
    date_created = fields.DateTime()
    last_processed_at = fields.DateTime(allow_none=True)
    times_processed = fields.Integer()


class UserUpdateSchema(Schema):
    """A user's fields as a client sets them."""

    name = _name(required=True)


class UserCreateSchema(UserUpdateSchema):
    id = _UserId()


class TaskSubmitSchema(Schema):
    """A task's IDs come as `payload` (a string) or `ids` (a list), never both."""

    task_name = _name(required=True)
    payload = _Payload(metadata={"description": "IDs as a string: '1,2,3'"})
    ids = _IdList(metadata={"description": "IDs as a list: [1, 2, 3]"})
    overflow = fields.String(validate=OneOf(list(Overflow)))
    not_before = _not_before(allow_none=True)
    limit = _naming_a_limit()

    @validates_schema
    def _one_id_source(self, data, partial=None, **kwargs):
        given = [name for name in ("payload", "ids") if name in data]
        if len(given) > 1:
            raise ValidationError("give either payload or ids, not both", "ids")
        if not given and not partial:
            raise ValidationError("give the IDs as payload or as ids", "ids")
        if given and not data[given[0]]:
            raise ValidationError("the list of IDs is empty", given[0])

    @validates_schema
    def _something_to_change(self, data, partial=None, **kwargs):
        # An empty update is most likely a client's mistake; saying so helps more than 200.
        if partial and not data:
            raise ValidationError("give at least one field to change")

    @staticmethod
    def openapi_rules(partial: bool) -> dict:
        """The rules above in the OpenAPI document: exactly one of the two, or at most one
        in a partial update, which changes something."""
        if partial:
            # Only the fields of one form or of the other: never both sources.
            others = ["task_name", "overflow", "not_before", "limit"]
            return {
                "minProperties": 1,
                "anyOf": [
                    {"properties": {name: {} for name in (*others, source)}}
                    | {"additionalProperties": False}
                    for source in ("payload", "ids")
                ],
            }
        return {"oneOf": [{"required": ["payload"]}, {"required": ["ids"]}]}


class TaskSummarySchema(RowSchema):
    """A task in a list: every field but `payload`, so that a page stays small."""

    id = fields.Integer()
    task_name = fields.String()
    task_status = fields.Boolean(metadata={"description": "true once the task has finished"})
    date_created = fields.DateTime()
    status = fields.String(metadata={"enum": list(TaskStatus)})
    limit = fields.String(
        attribute="limit_name",
        allow_none=True,
        metadata={"description": "its limit's name; null once the limit was deleted"},
    )
    overflow = fields.String()
    total = fields.Integer()
    duplicates = fields.Integer()
    planned = fields.Integer()
    done = fields.Integer()
    failed = fields.Integer()
    pending = fields.Integer()
    not_before = fields.DateTime(allow_none=True)
    first_slot = fields.DateTime(allow_none=True)
    last_slot = fields.DateTime(allow_none=True)
    error = fields.String(
        allow_none=True,
        metadata={
            "description": "why a `refused` task was not planned (its plan would have gone "
            "past the horizon, MAX_PLAN_DAYS); null otherwise"
        },
    )
    finished_at = fields.DateTime(
        allow_none=True, metadata={"description": "when it finished; null until it has"}
    )
    ids_removed_at = fields.DateTime(
        allow_none=True,
        metadata={
            "description": "when its IDs were removed, RETENTION_DAYS after it finished: "
            "its /ids/ then answer 410 Gone; null while they are kept"
        },
    )
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


def _header_skipped() -> fields.String:
    return fields.String(
        allow_none=True,
        metadata={
            "description": f"the first line of a text body, skipped as a header (its first "
            f"{SHOWN_CHARS} characters); null when none was"
        },
    )


class TaskAcceptedSchema(TaskSchema):
    message = fields.Constant("Task added to queue")
    task_id = fields.Function(lambda task: task.id, metadata={"type": "integer"})
    header_skipped = _header_skipped()


# The name of a task sent as a text body without one.
UNNAMED_TEXT_TASK = "text upload"


class TaskIdSchema(Schema):
    position = fields.Integer()
    id = fields.Integer(attribute="user_id")
    slot = fields.DateTime(allow_none=True)
    status = fields.String()
    attempts = fields.Integer()
    error = fields.String(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


OVERFLOW_DESCRIPTION = (
    "where the IDs beyond RPM go: spread over the window, or deferred to the next windows "
    f"(default: {Overflow.SPREAD.value!r})"
)


HEADER_DESCRIPTION = (
    "true: the body's first line is a header, skipped whatever it holds; without it, a "
    f"first line with no digit (of up to {MAX_HEADER_BYTES} bytes) is taken for one and "
    "skipped too. Either way the answer's header_skipped names it (default: false)"
)


def _with_a_text_body(description: str) -> str:
    # The query is checked whatever the body, but a JSON body carries these fields itself.
    return f"with a text body: {description}"


class TextSubmitQuerySchema(Schema):
    """Query of a POST whose body is IDs as text (text/csv or text/plain); the OpenAPI
    document lists its fields as that POST's query parameters."""

    task_name = _name(
        load_default=UNNAMED_TEXT_TASK,
        metadata={
            "description": _with_a_text_body(f"the task's name (default: {UNNAMED_TEXT_TASK!r})")
        },
    )
    overflow = fields.String(
        validate=OneOf(list(Overflow)),
        metadata={"description": _with_a_text_body(OVERFLOW_DESCRIPTION)},
    )
    not_before = _not_before(_with_a_text_body(NOT_BEFORE_DESCRIPTION))
    limit = _naming_a_limit(_with_a_text_body(PLANNED_UNDER))
    # true and false only, as the OpenAPI document's boolean says.
    header = fields.Boolean(
        load_default=False,
        truthy={"true"},
        falsy={"false"},
        metadata={"description": _with_a_text_body(HEADER_DESCRIPTION)},
    )


ID_STATUSES = ("received", *AssignmentStatus)


class TaskIdsQuerySchema(Schema):
    status = fields.String(validate=OneOf(ID_STATUSES))
    slot = moment("only the IDs of the slot starting then")


class SlotsQuerySchema(Schema):
    start = moment("first moment shown (default: the current window's start)", data_key="from")
    end = moment("end, exclusive (default: four windows after the start)", data_key="to")
    limit = limit_name(f"whose slots (default: {DEFAULT!r})")


class PageQuerySchema(Schema):
    """The page of an HTML list."""

    class Meta:
        # A browser's address may carry more than the page asks for; it still opens.
        unknown = EXCLUDE

    page = fields.Integer(load_default=1, validate=Range(min=1))
    limit = limit_name("whose plan")


class SlotSchema(Schema):
    start = fields.AwareDateTime()
    load = fields.Integer()
    capacity = fields.Integer(
        metadata={"description": "what it takes: the limit's learned rate, at most its rpm"}
    )
    done = fields.Integer()
    failed = fields.Integer()
    open = fields.Boolean(metadata={"description": "still taking new IDs"})
    started_at = fields.AwareDateTime(
        allow_none=True, metadata={"description": "when its first ID was claimed"}
    )
    late = fields.Boolean(metadata={"description": "it ran after its time"})
    replanned = fields.Boolean(
        metadata={"description": "it took IDs moved by a re-plan, when the learned rate changed"}
    )


class WindowSchema(Schema):
    start = fields.AwareDateTime()
    end = fields.AwareDateTime()
    load = fields.Integer()
    capacity = fields.Integer()
    slots = fields.List(fields.Nested(SlotSchema))


class PlanSchema(Schema):
    limit = fields.String(metadata={"description": "whose slots these are"})
    paused = fields.Boolean(metadata={"description": "its slots do not run until resumed"})
    rpm = fields.Integer(metadata={"description": "the limit's configured rate"})
    learned_rpm = fields.Integer(
        metadata={"description": "what its downstream takes, as refusals showed: at most rpm"}
    )
    slot_seconds = fields.Integer()
    window_slots = fields.Integer()
    now = fields.AwareDateTime()
    windows = fields.List(fields.Nested(WindowSchema))


class LivenessSchema(Schema):
    status = fields.String(metadata={"description": "ok: the process answers"})


class CheckSchema(Schema):
    ok = fields.Boolean()
    detail = fields.String(metadata={"description": "how long it took, or why it failed"})


class ReadinessSchema(Schema):
    status = fields.Constant("ok", metadata={"description": "every check passed"})
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(CheckSchema),
        metadata={
            "description": "database, migrations and redis; and destinations, which is "
            "always ok and names the limits held because their destination is not allowed"
        },
    )


class ErrorSchema(error_handler.ErrorSchema):
    """Every error answer of the API: flask-smorest's shape, its fields said for a client."""

    message = fields.String(metadata={"description": "what is wrong, in words"})
    errors = fields.Dict(
        keys=fields.String(),
        metadata={
            "description": "what was wrong, by the field the client sent, whether in the body "
            "or in the query (`_schema`: the body or the query as a whole); bad IDs under "
            "`ids` (or `payload`) as `invalid` (how many), `submitted` (of how many) and "
            f"`listed` (the first {MAX_REPORTED_ERRORS}, in order: `index` in a JSON list, "
            "0-based, or `line` and `column` in text, 1-based; `token`; `reason`)"
        },
    )


class NotReadySchema(ErrorSchema):
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "each failed check, and why"},
    )


class PreviewSlotSchema(Schema):
    start = fields.AwareDateTime()
    added = fields.Integer(metadata={"description": "IDs of the task it would take"})
    load = fields.Integer(metadata={"description": "its load with them"})
    capacity = fields.Integer(
        metadata={"description": "what the slot takes: RPM, or the learned rate below it"}
    )


class PreviewSchema(Schema):
    """Where a task's IDs would land if it were submitted now."""

    now = fields.AwareDateTime(metadata={"description": "the planning time of the preview"})
    limit = fields.String(metadata={"description": "the limit it was planned under"})
    rpm = fields.Integer()
    capacity = fields.Integer(
        metadata={
            "description": "what each slot takes: RPM, or the limit's learned rate when "
            "its downstream refused more (learned_rpm)"
        }
    )
    overflow = fields.String(metadata={"enum": list(Overflow)})
    not_before = fields.AwareDateTime(allow_none=True)
    total = fields.Integer(metadata={"description": "distinct IDs"})
    duplicates = fields.Integer(metadata={"description": "repeated IDs, dropped"})
    first_slot = fields.AwareDateTime()
    last_slot = fields.AwareDateTime()
    slots_above_rpm = fields.Integer(
        metadata={"description": "slots that would end above their capacity"}
    )
    slots = fields.List(
        fields.Nested(PreviewSlotSchema), metadata={"description": "the slots it would use"}
    )
    header_skipped = _header_skipped()


# Refusals in a row a limit may allow an ID at most.
MAX_REFUSALS = 1000


def _only_null(value) -> None:
    if value is not None:
        raise ValidationError("only null, which resets the learned rate to rpm")


class LastRefusalSchema(Schema):
    at = fields.AwareDateTime()
    status = fields.Integer(
        allow_none=True, metadata={"description": "the HTTP status, when there was one"}
    )
    retry_after = fields.Float(
        allow_none=True, metadata={"description": "seconds it asked to wait, if it said"}
    )
    reason = fields.String()


class LimitSchema(Schema):
    """A limit as answered, with the counts of its tasks' IDs."""

    name = fields.String()
    rpm = fields.Integer()
    processor = fields.String()
    options = fields.Dict(keys=fields.String())
    paused = fields.Boolean(metadata={"description": "its slots do not run until resumed"})
    held = fields.String(
        allow_none=True,
        metadata={
            "description": "why its slots do not run although it is not paused: its "
            "destination (URL or secret) is not allowed by the deployment's settings "
            "(DOWNSTREAM_URLS, DOWNSTREAM_SECRET_<NAME>); null when it is"
        },
    )
    adaptive = fields.Boolean(
        metadata={"description": "the downstream's refusals lower its learned rate"}
    )
    learned_rpm = fields.Integer(
        metadata={
            "description": "what a slot takes as the downstream's refusals have shown: "
            "rpm until it refuses, lowered then, rising again after a quiet period; "
            "planning, re-plans and previews use it"
        }
    )
    max_refusals = fields.Integer(
        metadata={"description": "refusals of one ID in a row that fail it for good"}
    )
    refusals = fields.Integer(metadata={"description": "calls the downstream refused, in all"})
    last_refusal = fields.Nested(
        LastRefusalSchema,
        allow_none=True,
        metadata={"description": "the downstream's last refusal; null if it never refused"},
    )
    pending = fields.Integer(metadata={"description": "IDs of its tasks not yet finished"})
    done = fields.Integer()
    failed = fields.Integer(metadata={"description": "IDs failed after every attempt"})
    slots_url = fields.Function(
        lambda limit: url_for("slots.Plan", limit=limit["name"], _external=True),
        metadata={"type": "string"},
    )
    events_url = fields.Function(
        lambda limit: url_for("limits.LimitEvents", limit_name=limit["name"], _external=True),
        metadata={"type": "string", "description": "the changes of its learned rate"},
    )


class LimitEventSchema(Schema):
    """A change of a limit's learned rate, and the re-plan it caused."""

    id = fields.Integer()
    at = fields.AwareDateTime()
    kind = fields.String(metadata={"enum": ["lowered", "raised", "reset"]})
    reason = fields.String(metadata={"description": "why: the refusals, a quiet period"})
    from_rpm = fields.Integer()
    to_rpm = fields.Integer()
    moved = fields.Integer(metadata={"description": "IDs the re-plan moved to other slots"})
    finished_at = fields.AwareDateTime(
        allow_none=True,
        metadata={"description": "when its re-plan ended; null while under way"},
    )


class LimitUpdateSchema(Schema):
    """A limit's fields as a client sets them; its name is its key, in the path."""

    rpm = fields.Integer(
        required=True,
        strict=True,
        validate=Range(min=1, max=MAX_RPM),
        metadata={"description": "IDs a slot takes before any slot of a window takes more"},
    )
    processor = fields.String(
        validate=[Length(max=255), Regexp(PROCESSOR_PATTERN, error="must be module:function")],
        metadata={
            "description": "module:function, importable (default: "
            f"{DEFAULT_PROCESSOR}); see the processor contract in the README"
        },
    )
    options = fields.Dict(
        keys=fields.String(),
        metadata={"description": "what the processor needs, checked by its own schema"},
    )
    paused = _JsonBoolean(
        metadata={
            "description": "true: its slots stop running, its IDs stay pending; false: "
            "resumed, its IDs whose slot passed meanwhile are planned again from now "
            "(default false)"
        }
    )
    adaptive = _JsonBoolean(
        metadata={
            "description": "true (default): refusals (HTTP 429, 503) lower the learned "
            "rate and re-plan; false: refused IDs are only planned again after their "
            "Retry-After, and the learned rate goes back to rpm"
        }
    )
    max_refusals = fields.Integer(
        strict=True,
        validate=Range(min=1, max=MAX_REFUSALS),
        metadata={"description": "refusals of one ID in a row that fail it (default 30)"},
    )
    learned_rpm = fields.Raw(
        allow_none=True,
        validate=_only_null,
        metadata={
            "type": "null",
            "description": "null resets the learned rate to rpm (PATCH only); IDs may "
            "then move earlier",
        },
    )


class LimitReplaceSchema(LimitUpdateSchema):
    """PUT: every writable field, so that one a client leaves out is refused, not reset.
    The learned rate is state, not a field to replace: PATCH resets it."""

    def on_bind_field(self, field_name, field_obj):
        field_obj.required = True

    class Meta:
        exclude = ("learned_rpm",)


class LimitCreateSchema(LimitUpdateSchema):
    name = limit_name("the limit's key", required=True)

    class Meta:
        exclude = ("learned_rpm",)
