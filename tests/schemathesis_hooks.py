"""Loaded by schemathesis in tests/web/test_openapi_contract.py (SCHEMATHESIS_HOOKS).

What a client sends that no document can state, it sends as a client would:

- a fresh Idempotency-Key with each new request; schemathesis draws the same few keys for
  different bodies, which the API rightly refuses (422);
- the name of a limit that exists, and a processor that can be imported with options it
  takes: which limits and modules exist is the deployment's, not the document's;
- a start (`not_before`) at most a year ahead, and within the plan's horizon
  (MAX_PLAN_DAYS): the document can state its years, not how far ahead of the day of the
  request it may be;
- with `header=true`, a text body whose first line is a header: the document states the
  body and the query, not that the one changes what the other may hold.

Only well-formed values are replaced; a malformed one is left as drawn, to be refused.
"""

import re
import uuid
from datetime import UTC, datetime, timedelta

import schemathesis

from service.core.config import Config
from service.limits.store import DEFAULT, DEFAULT_PROCESSOR
from service.web.idempotency import HEADER
from service.web.schemas import (
    LIMIT_NAME_PATTERN,
    MAX_LIMIT_NAME,
    MAX_START_AHEAD,
    PLAUSIBLE_YEAR_PATTERN,
    PROCESSOR_PATTERN,
)

WELL_FORMED_KEY = re.compile(r"[ -~]{1,255}")
EXISTING = {"limit": DEFAULT, "processor": DEFAULT_PROCESSOR, "options": {}}
WELL_FORMED = {
    "limit": lambda value: _matches(LIMIT_NAME_PATTERN, value) and len(value) <= MAX_LIMIT_NAME,
    "processor": lambda value: _matches(PROCESSOR_PATTERN, value),
    "options": lambda value: isinstance(value, dict),
}


def _matches(pattern: str, value) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _too_far_ahead(value) -> bool:
    """A well-formed start that the server refuses only for being too far ahead: more than
    a year, or past the horizon of the served app's default MAX_PLAN_DAYS."""
    if not (isinstance(value, str) and re.match(PLAUSIBLE_YEAR_PATTERN, value)):
        return False
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return False
    # A day short of the limit: the server reads its clock later than this hook.
    ahead = min(MAX_START_AHEAD, timedelta(days=Config.MAX_PLAN_DAYS))
    reach = datetime.now(UTC) + ahead - timedelta(days=1)
    return moment.tzinfo is not None and moment > reach


def _as_a_client_would(fields) -> None:
    if not isinstance(fields, dict):
        return
    for name, well_formed in WELL_FORMED.items():
        if name in fields and well_formed(fields[name]):
            fields[name] = EXISTING[name]
    if _too_far_ahead(fields.get("not_before")):
        fields["not_before"] = (datetime.now(UTC) + timedelta(days=1)).isoformat()


# A first line without a digit: the server takes it for a header with or without header=true.
HEADER_LINE = re.compile(r"\ufeff?[^0-9\n]*[^0-9\n, \t\r\f\v][^0-9\n]*\n")


def _with_a_header_line(case) -> None:
    said = (case.query or {}).get("header") in (True, "true")
    if not said or not isinstance(case.body, str) or HEADER_LINE.match(case.body):
        return
    mark = "\ufeff" if case.body.startswith("\ufeff") else ""
    case.body = f"{mark}user_id\n{case.body.removeprefix(mark)}"


@schemathesis.hook
def before_call(context, case, kwargs):
    key = (case.headers or {}).get(HEADER)
    if isinstance(key, str) and WELL_FORMED_KEY.fullmatch(key):
        case.headers[HEADER] = uuid.uuid4().hex
    _as_a_client_would(case.body)
    _as_a_client_would(case.query)
    _with_a_header_line(case)
