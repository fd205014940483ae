"""The built-in processors under their public paths: limits and ID_PROCESSOR name
them as `workers.processors:record_user` and `workers.processors:http_request`."""

from service.processors.builtin import http_request, record_user

__all__ = ["http_request", "record_user"]
