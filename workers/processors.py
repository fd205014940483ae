"""The processors' public paths. Limits and ID_PROCESSOR name the built-in ones as
`workers.processors:record_user` and `workers.processors:http_request`, and a processor
written elsewhere imports the contract from here (`from workers.processors import
Failure, Refused, per_id, processor`): stored limits keep working as they were.
The code lives in service/processors/."""

from service.processors.builtin import http_request, record_user
from service.processors.contract import Failure, Refused, per_id, processor

__all__ = ["Failure", "Refused", "http_request", "per_id", "processor", "record_user"]
