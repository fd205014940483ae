"""The processors' public paths. Limits and ID_PROCESSOR name the built-in ones as
`workers.processors:record_user` and `workers.processors:http_request`, and a processor
written elsewhere imports the contract from here (`from workers.processors import
Failure, per_id`): stored limits and deployed processors keep working as they were.
The code lives in service/processors/."""

from service.processors.builtin import http_request, record_user
from service.processors.contract import Failure, per_id

__all__ = ["Failure", "http_request", "per_id", "record_user"]
