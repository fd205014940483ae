"""Loaded by schemathesis in tests/test_openapi_contract.py (SCHEMATHESIS_HOOKS).

A client sends a fresh Idempotency-Key with each new request; schemathesis draws the same
few keys for different bodies, which the API rightly refuses (422). A well-formed key is
made fresh before each call, a malformed one is left as drawn, to be refused.
"""

import re
import uuid

import schemathesis

from service.idempotency import HEADER

WELL_FORMED_KEY = re.compile(r"[ -~]{1,255}")


@schemathesis.hook
def before_call(context, case, kwargs):
    key = (case.headers or {}).get(HEADER)
    if isinstance(key, str) and WELL_FORMED_KEY.fullmatch(key):
        case.headers[HEADER] = uuid.uuid4().hex
