"""The built-in processors (the contract is in service/processors/contract.py):

- `record_user`, a group processor: records each user in the database, in the
  transaction that records the outcomes;
- `http_request`, a per-ID processor: one HTTP call per ID to the downstream its
  options name (`url`, `method`, `timeout`, and the name of a secret as
  `authorization`), awaited concurrently on the slot job's event loop over pooled
  keep-alive connections (aiohttp), only to destinations the deployment allows
  (service/core/destinations.py).

Limits name them by their public paths, `workers.processors:record_user` and
`workers.processors:http_request`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
import yarl
from flask import current_app
from marshmallow import Schema, ValidationError, fields, validates_schema
from marshmallow.validate import URL, OneOf, Range, Regexp
from sqlalchemy import text

from service.core.config import SECRET_NAME, SECRET_VARIABLE
from service.core.destinations import (
    CachingResolver,
    Destination,
    NotAllowed,
    parse_url,
    wire_host,
)
from service.core.extensions import db
from service.processors.contract import Failure, Refused, per_id, processor

# Answers worth another attempt: the resource is busy or broken, not the request.
RETRYABLE_HTTP = {408, 425}
# Answers that refuse the call for now: no failure of the ID, a lesson about the rate.
REFUSING_HTTP = {429, 503}


@processor
def record_user(user_ids: list[int]) -> dict[int, Failure]:
    """Create each user if absent; stamp last_processed_at and count the time."""
    times = Counter(user_ids)
    ids = sorted(times)  # rows locked in one order, so two workers never deadlock on them
    db.session.execute(
        text(
            "INSERT INTO users (id, last_processed_at, times_processed) "
            "SELECT u.id, clock_timestamp(), u.n "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:times AS int[])) AS u(id, n) "
            "ON CONFLICT (id) DO UPDATE SET last_processed_at = EXCLUDED.last_processed_at, "
            "  times_processed = users.times_processed + EXCLUDED.times_processed"
        ),
        {"ids": ids, "times": [times[user_id] for user_id in ids]},
    )
    return {}


def _holds_id(url: str) -> None:
    if "{id}" not in url:
        raise ValidationError("must hold {id}, where each user ID goes")


def destination_refusal(template: str) -> str | None:
    """Why calls to a URL with {id} may not go where it says under this deployment's
    settings (DOWNSTREAM_URLS, PROCESSOR_HTTP_URL), judged on its text; None when they
    may (each call is judged again on the address its host resolves to)."""
    try:
        authority = urlsplit(template).netloc
    except ValueError:
        return "is not a URL that can be called"
    if "{id}" in authority:
        return "must hold {id} in its path or its query, not in its host"
    return current_app.config["DOWNSTREAM_ALLOW_LIST"].refusal(template.replace("{id}", "1"))


def secret_refusal(name: str, template: str) -> str | None:
    """Why the secret `name` may not go with calls to a URL with {id}, or None."""
    secrets = current_app.config["DOWNSTREAM_SECRETS"]
    secret = secrets.get(name)
    if secret is None:
        known = ", ".join(sorted(secrets)) or "none"
        # The name is not repeated: a client may have written a secret's value there.
        return f"names no secret of this deployment ({SECRET_VARIABLE}<NAME>); it holds: {known}"
    try:
        url = parse_url(template.replace("{id}", "1"))
    except NotAllowed:
        return None  # the URL's own refusal says why
    if not secret.covers(url):
        return f"{name} is sent only to URLs under {secret.prefix.text}, and the url is not"
    return None


def _allowed_destination(template: str) -> None:
    refused = destination_refusal(template)
    if refused:
        raise ValidationError(refused)


class HttpOptions(Schema):
    """Options of `http_request`: where and how to call, and how long to wait."""

    url = fields.String(
        required=True,
        validate=[
            URL(schemes={"http", "https"}, require_tld=False),
            _holds_id,
            _allowed_destination,
        ],
        metadata={
            "description": "the URL of each call, with {id} where the ID goes; under a "
            "prefix of DOWNSTREAM_URLS (or PROCESSOR_HTTP_URL's)"
        },
    )
    authorization = fields.String(
        validate=Regexp(SECRET_NAME, error="must be a secret's NAME: A-Z, 0-9 and _"),
        metadata={
            "description": "the NAME of a secret of the deployment "
            f"({SECRET_VARIABLE}<NAME>), sent as each call's Authorization header, only "
            "to URLs under the secret's prefix; the value is never shown"
        },
    )
    method = fields.String(
        load_default="POST", validate=OneOf(["GET", "POST", "PUT", "PATCH", "DELETE"])
    )
    timeout = fields.Float(
        load_default=10.0,
        validate=Range(min=0, max=300, min_inclusive=False),
        metadata={"description": "seconds to wait for each answer"},
    )

    @validates_schema
    def _secret_only_under_its_prefix(self, data: dict, **kwargs) -> None:
        if "authorization" in data:
            refused = secret_refusal(data["authorization"], data["url"])
            if refused:
                raise ValidationError(refused, "authorization")


def _why_held(options: dict) -> str | None:
    """Why a limit's stored options may not be used under this deployment's settings:
    its URL, or its secret, is no longer allowed."""
    template = options.get("url")
    if not template:
        return None
    refused = destination_refusal(template)
    if refused:
        return f"its URL {refused}"
    name = options.get("authorization")
    refused = secret_refusal(name, template) if name else None
    return f"its authorization: {refused}" if refused else None


@per_id
async def http_request(user_id: int, key: str, options: dict) -> Failure | None:
    """One HTTP request to the `url` of the options, `{id}` replaced by the ID, awaited
    on the slot job's event loop.

    It carries the ID's `Idempotency-Key` (the deployment's id, its task and position:
    the same on every attempt), so a downstream that deduplicates by key knows a
    repeated call. It lasts at most `longest_call`, four times the timeout. 2xx is
    done. 429 and 503 are refusals (planned again after their Retry-After, using no
    attempt); 408, 425, other 5xx, timeouts and connection errors are retried; any
    other answer fails the ID for good.

    Nothing is called unless the URL is allowed (DOWNSTREAM_URLS) and so is every
    address its host resolves to; the connection goes to one of those very addresses.
    A refusal fails the ID for good, saying why. The Authorization header is sent only
    under its secret's prefix.
    """
    template = options.get("url")
    if not template:  # a default limit recorded from settings that set no URL
        return Failure("the limit's options name no url", retry=False)
    url = template.replace("{id}", str(user_id))
    shown = _without_query(url)
    try:
        target = current_app.config["DOWNSTREAM_ALLOW_LIST"].destination(url, _resolver())
        authorization = _authorization(target, options.get("authorization"))
    except NotAllowed as refused:
        return Failure(f"not called: {shown} {refused}", retry=False)
    except OSError as exc:  # the name does not resolve (now)
        return Failure(f"cannot resolve the host of {shown}: {exc}")
    headers = {"Idempotency-Key": key, "Host": target.host_header}
    if authorization:
        headers["Authorization"] = authorization
    return await _call(target, options, headers, shown)


async def _call(target: Destination, options: dict, headers: dict, shown: str) -> Failure | None:
    """Call the checked addresses in turn, the next only when one refused to connect (as
    a connection to the name would), always asking for the URL's host (Host, and SNI
    for https, against which its certificate is verified)."""
    timeout = options["timeout"]
    host = wire_host(target.url)
    session = _session(timeout, host)
    deadline = asyncio.get_running_loop().time() + (HTTP_CALL_PHASES - 1) * timeout
    for address in target.addresses:
        where = yarl.URL(str(target.at(address)), encoded=True)
        try:
            async with session.request(
                options["method"],
                where,
                headers=headers,
                server_hostname=host if where.scheme == "https" else None,
                allow_redirects=False,
            ) as answer:
                await _read_briefly(answer, deadline)
        except aiohttp.ClientConnectorError as exc:
            refused = exc
            continue
        except TimeoutError:
            return Failure(f"timed out calling {shown}")
        except aiohttp.ClientError as exc:
            return Failure(f"{type(exc).__name__} calling {shown}: {exc}")
        return _verdict(answer, shown)
    return Failure(f"ConnectError calling {shown}: {refused}")


def _verdict(answer: aiohttp.ClientResponse, shown: str) -> Failure | None:
    """2xx is done; 429 and 503 refuse the call for now, for as long as their
    Retry-After says; 408, 425 and the other 5xx are failures worth another attempt;
    anything else fails the ID for good."""
    status = answer.status
    if 200 <= status < 300:
        return None
    message = f"HTTP {status} from {shown}"
    if status in REFUSING_HTTP:
        retry_after = retry_after_seconds(answer.headers.get("retry-after"))
        return Refused(message, retry_after=retry_after, status=status)
    return Failure(message, retry=status in RETRYABLE_HTTP or status >= 500)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header's wait in seconds: a number of seconds, or an HTTP date from
    `now` on; None when absent or neither (the wait is then the service's to choose,
    and so is the bound on one that is absurd)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": a time in UTC, says RFC 5322
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def _authorization(target: Destination, name: str | None) -> str | None:
    """The Authorization header of a call: the limit's own secret when it names one,
    refused outside that secret's prefix; else PROCESSOR_HTTP_AUTHORIZATION under
    PROCESSOR_HTTP_URL's prefix; else none."""
    config = current_app.config
    if name:
        secret = config["DOWNSTREAM_SECRETS"].get(name)
        if secret is None:
            raise NotAllowed(f"names the secret {name}, which this deployment does not hold")
        if not secret.covers(target.url):
            raise NotAllowed(f"is not under the prefix of its secret {name}")
        return secret.value
    fallback = config["PROCESSOR_HTTP_SECRET"]
    return fallback.value if fallback and fallback.covers(target.url) else None


# Each process resolves a host again once its answer is this old (RESOLVE_CACHE_SECONDS).
_system_resolver = CachingResolver()


def _resolver():
    """The resolver calls are checked against; an app's DOWNSTREAM_RESOLVER (a function
    of host and port, returning addresses) stands in for the system's, in tests."""
    return current_app.config.get("DOWNSTREAM_RESOLVER") or _system_resolver


def _without_query(url: str) -> str:
    """A URL as an error text names it: a query string may carry a client's token, and
    a user and password are no part of where a call goes."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the limit's url"
    where = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=where, query="", fragment="").geturl()


# Each waits at most `timeout`: connecting, sending, the answer's first byte, its last.
HTTP_CALL_PHASES = 4
# Of an answer's body (unused) this much is read, so the connection can serve again.
ANSWER_BYTES = 64 * 1024


async def _read_briefly(answer: aiohttp.ClientResponse, deadline: float) -> None:
    """Read the answer, but no more than ANSWER_BYTES and not past the deadline (on the
    loop's clock): a downstream that trickles its answer cannot stretch a call beyond
    its budget. An answer cut short closes its connection instead of returning it to
    the pool."""
    read = 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in answer.content.iter_any():
                read += len(chunk)
                if read > ANSWER_BYTES:
                    answer.close()
                    return
    except TimeoutError:
        answer.close()


async def _prepare(options: dict) -> None:
    """The pooled session of the limit's host, and its addresses resolved (kept for
    RESOLVE_CACHE_SECONDS): made on the slot job's loop before the slot's first turn,
    not by its first calls at once. A URL that is refused or does not resolve is left
    to the calls to say."""
    template = options.get("url")
    if not template:
        return
    try:
        target = current_app.config["DOWNSTREAM_ALLOW_LIST"].destination(
            template.replace("{id}", "1"), _resolver()
        )
    except (NotAllowed, OSError):
        return
    _session(options.get("timeout", 10.0), wire_host(target.url))


async def _close(options: dict) -> None:
    """Close the sessions this loop opened: the loop ends with its slot job."""
    loop = asyncio.get_running_loop()
    mine = [key for key in _clients if key[0] is loop]
    for key in mine:
        await _clients.pop(key).close()


http_request.options_schema = HttpOptions
http_request.prepare = _prepare
http_request.close = _close
http_request.longest_call = lambda options: HTTP_CALL_PHASES * options.get("timeout", 10.0)
http_request.why_held = _why_held


# Pooled sessions by (event loop, size, timeout, host called).
_clients: dict[tuple, aiohttp.ClientSession] = {}


def _session(timeout: float, host: str) -> aiohttp.ClientSession:
    """One pooled session per event loop, settings, timeout and host called (a session
    belongs to its loop; a TLS connection made for one host name is never reused for
    another that shares its address), holding up to PROCESSOR_ASYNC_CONCURRENCY
    keep-alive connections. No header rides on the session: a secret goes only with
    the calls under its prefix. aiohttp follows no proxy the environment names (it
    would carry the call, and its Authorization, from another network than the one
    the address was checked for), and its certificates are the system's, or
    SSL_CERT_FILE's, as the session is made."""
    size = current_app.config["PROCESSOR_ASYNC_CONCURRENCY"]
    key = (asyncio.get_running_loop(), size, timeout, host)
    if key not in _clients:
        connector = aiohttp.TCPConnector(
            limit=size, limit_per_host=size, ssl=ssl.create_default_context()
        )
        _clients[key] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            trust_env=False,
            auto_decompress=False,
        )
    return _clients[key]
