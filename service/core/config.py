"""Settings, read once from the environment, converted and checked."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from service.core.destinations import AllowList, NotAllowed, Prefix, Secret, prefix_of_template
from service.core.logs import LOG_FORMATS

ROOT = Path(__file__).resolve().parents[2]
# `make run` writes the addresses of the servers it uses here while it runs, so that a
# `flask ...` command in the same folder reaches its stack with no setup.
STACK_FILE = "stack.env"
STACK_ADDRESSES = ("DATABASE_URL", "REDIS_URL")


# A slot's job is added at least this many reconcile runs before the slot starts.
RECONCILES_AHEAD = 3

# A shorter API token is refused: it could be guessed by trying.
MIN_TOKEN_CHARS = 16


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the process must not start."""


def _sqlalchemy_url(url: str) -> str:
    # Operators write plain postgresql:// URLs; SQLAlchemy needs the driver named.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# The built-in processors' public paths (their code is in service/processors/builtin.py):
# limits and ID_PROCESSOR store them, so they never change.
PROCESSORS_MODULE = "workers.processors"
RECORD_USER = f"{PROCESSORS_MODULE}:record_user"
HTTP_PROCESSOR = f"{PROCESSORS_MODULE}:http_request"

# DOWNSTREAM_SECRET_<NAME> holds a secret, DOWNSTREAM_SECRET_<NAME>_URL its prefix.
SECRET_VARIABLE = "DOWNSTREAM_SECRET_"
SECRET_URL_SUFFIX = "_URL"
SECRET_NAME = re.compile(r"[A-Z0-9_]+\Z")
# What an HTTP header's value may hold (visible ASCII, spaces and tabs inside): a value
# outside it makes the HTTP library raise an error that quotes it, and errors are stored.
HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?\Z")


@dataclass(frozen=True)
class SecretSetting:
    """A downstream secret as the environment gives it: its value and its URL prefix."""

    name: str
    value: str = field(default="", repr=False)
    url: str = ""


@dataclass(frozen=True)
class Config:
    """Every setting of the service; README.md documents each one."""

    DATABASE_URL: str = ""
    REDIS_URL: str = ""
    RPM: int = 120
    PLAN_LEAD_SECONDS: float = 2.0
    SLOT_SECONDS: int = 60
    WINDOW_SLOTS: int = 15
    # Unset: half the window, rounded up.
    SPREAD_MIN_OPEN_SLOTS: int | None = None
    # IDs a second that planning is assumed to write at least; it sets how far ahead a
    # task's first slot must start (see service/planning.py).
    PLANNING_RATE: int = 100_000
    MAX_ATTEMPTS: int = 3
    RETRY_BACKOFF_SECONDS: float = 60.0
    PACING: bool = True
    CLAIM_TIMEOUT_SECONDS: int = 300
    # Every Redis command, and every new PostgreSQL connection, gives up after this.
    REDIS_TIMEOUT_SECONDS: float = 5.0
    DATABASE_CONNECT_TIMEOUT_SECONDS: int = 5
    RECONCILE_INTERVAL_SECONDS: int = 10
    # A task whose last ID would land later than this after now is refused.
    MAX_PLAN_DAYS: int = 30
    # rq-scheduler holds the jobs of the slots starting within this; reconcile adds the
    # later ones as time passes.
    SCHEDULE_AHEAD_MINUTES: int = 120
    ID_PROCESSOR: str = RECORD_USER
    # The modules a limit's processor may come from, comma-separated: naming a processor
    # over the API imports its module, so only the operator's choice of modules can be.
    PROCESSOR_MODULES: str = PROCESSORS_MODULE
    PROCESSOR_HTTP_URL: str | None = None
    # URL prefixes, comma-separated, that a limit's URL must be under (PROCESSOR_HTTP_URL's
    # own prefix is always one): the API may write limits, only the operator says where
    # their calls may go. See service/core/destinations.py.
    DOWNSTREAM_URLS: str = ""
    PROCESSOR_HTTP_METHOD: str = "POST"
    PROCESSOR_HTTP_TIMEOUT: float = 10.0
    # Sent as the Authorization header of the calls under PROCESSOR_HTTP_URL's prefix
    # whose limit names no secret of its own; never shown or logged.
    PROCESSOR_HTTP_AUTHORIZATION: str | None = field(default=None, repr=False)
    # Calls of a per-ID processor in flight at once, per slot job.
    PROCESSOR_CONCURRENCY: int = 64
    # Calls of an async per-ID processor in flight at once, per slot job: they wait on
    # one event loop, not a thread each, so thousands cost little.
    PROCESSOR_ASYNC_CONCURRENCY: int = 2000
    # Helper jobs a slot that runs behind its turns may add, to share it.
    MAX_HELPERS_PER_SLOT: int = 4
    API_TOKEN: str | None = field(default=None, repr=False)
    # Host names the API answers, comma-separated; empty: any.
    ALLOWED_HOSTS: str = ""
    MAX_IDS_PER_TASK: int = 10_000_000
    MAX_CONTENT_LENGTH: int = 16 * 1024 * 1024
    # A POST's Idempotency-Key and its first answer are kept at least this long.
    IDEMPOTENCY_KEY_HOURS: int = 24
    # A day's IDs are dropped once every task of that day finished at least this long ago.
    RETENTION_DAYS: int = 30
    # "text" for people reading a terminal, "json" for a log collector.
    LOG_FORMAT: str = "text"
    # The names the environment gave; the others took their defaults.
    explicit: frozenset[str] = field(default=frozenset(), repr=False)
    # DOWNSTREAM_SECRET_<NAME> and DOWNSTREAM_SECRET_<NAME>_URL, by name.
    secrets: tuple[SecretSetting, ...] = field(default=(), repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """The settings of `environ`, by default this process's environment, where a
        running `make run` stack fills in the server addresses left unset."""
        environ = with_stack_addresses(os.environ) if environ is None else environ
        values = {}
        for setting in fields(cls):
            raw = environ.get(setting.name, "").strip()
            if raw and setting.name.isupper():
                values[setting.name] = _convert(setting.name, raw, setting.type)
        return cls(**values, explicit=frozenset(values), secrets=_secrets_in(environ))

    def __post_init__(self) -> None:
        for name in ("DATABASE_URL", "REDIS_URL"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        positive = (
            "RPM",
            "SLOT_SECONDS",
            "WINDOW_SLOTS",
            "MAX_ATTEMPTS",
            "MAX_IDS_PER_TASK",
            "MAX_CONTENT_LENGTH",
            "PLANNING_RATE",
            "RECONCILE_INTERVAL_SECONDS",
            "MAX_PLAN_DAYS",
            "SCHEDULE_AHEAD_MINUTES",
            "PROCESSOR_CONCURRENCY",
            "PROCESSOR_ASYNC_CONCURRENCY",
            "IDEMPOTENCY_KEY_HOURS",
            "RETENTION_DAYS",
            "DATABASE_CONNECT_TIMEOUT_SECONDS",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("PLAN_LEAD_SECONDS", "RETRY_BACKOFF_SECONDS", "MAX_HELPERS_PER_SLOT"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.REDIS_TIMEOUT_SECONDS <= 0:
            raise ConfigError("REDIS_TIMEOUT_SECONDS must be more than 0")
        self._check_spread_min_open_slots()
        self._check_schedule_ahead()
        if self.PROCESSOR_HTTP_URL and "{id}" not in self.PROCESSOR_HTTP_URL:
            raise ConfigError("PROCESSOR_HTTP_URL must hold {id}, where each user ID goes")
        self._check_destinations()
        if ":" not in self.ID_PROCESSOR:
            raise ConfigError("ID_PROCESSOR must be a 'module:function' path")
        if self.API_TOKEN is not None and len(self.API_TOKEN) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"API_TOKEN must be at least {MIN_TOKEN_CHARS} characters: a short one is "
                "guessed; make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"
            )
        if self.LOG_FORMAT not in LOG_FORMATS:
            choices = " or ".join(LOG_FORMATS)
            raise ConfigError(f"LOG_FORMAT must be {choices}, got {self.LOG_FORMAT!r}")

    @property
    def spread_min_open_slots(self) -> int:
        """SPREAD_MIN_OPEN_SLOTS, by default half the window rounded up."""
        if self.SPREAD_MIN_OPEN_SLOTS is None:
            return -(-self.WINDOW_SLOTS // 2)
        return self.SPREAD_MIN_OPEN_SLOTS

    def _check_spread_min_open_slots(self) -> None:
        if not 1 <= self.spread_min_open_slots <= self.WINDOW_SLOTS:
            raise ConfigError(
                f"SPREAD_MIN_OPEN_SLOTS must be from 1 to WINDOW_SLOTS ({self.WINDOW_SLOTS}), "
                f"got {self.SPREAD_MIN_OPEN_SLOTS}"
            )

    def _check_schedule_ahead(self) -> None:
        # Reconcile adds a slot's job once the slot is within SCHEDULE_AHEAD_MINUTES: so
        # that it is there several runs before the slot starts, even when a run or two
        # fail, the window must hold that many runs.
        least = RECONCILES_AHEAD * self.RECONCILE_INTERVAL_SECONDS
        if least > self.SCHEDULE_AHEAD_MINUTES * 60:
            raise ConfigError(
                f"SCHEDULE_AHEAD_MINUTES must cover at least {RECONCILES_AHEAD} reconcile "
                f"intervals ({least} s with RECONCILE_INTERVAL_SECONDS="
                f"{self.RECONCILE_INTERVAL_SECONDS}), got {self.SCHEDULE_AHEAD_MINUTES}"
            )

    def _check_destinations(self) -> None:
        # Parsed now, so that a malformed prefix or a half-given or unsendable secret
        # refuses the start.
        _ = self.allow_list, self.downstream_secrets, self.processor_http_secret
        if self.PROCESSOR_HTTP_AUTHORIZATION and not self.PROCESSOR_HTTP_URL:
            raise ConfigError(
                "PROCESSOR_HTTP_AUTHORIZATION is sent only to URLs under PROCESSOR_HTTP_URL's "
                "prefix, and PROCESSOR_HTTP_URL is unset: set it, or give the limits that "
                "need the header a secret of their own (DOWNSTREAM_SECRET_<NAME>)"
            )

    @property
    def processor_http_prefix(self) -> Prefix | None:
        """PROCESSOR_HTTP_URL's prefix: its origin and its path up to the segment that
        holds {id} (`http://h:9000/users/{id}` gives `http://h:9000/users/`)."""
        if not self.PROCESSOR_HTTP_URL:
            return None
        try:
            return prefix_of_template(self.PROCESSOR_HTTP_URL, "PROCESSOR_HTTP_URL")
        except ValueError as refused:  # NotAllowed, or a URL that cannot even be split
            raise ConfigError(f"PROCESSOR_HTTP_URL {refused}") from None

    @property
    def allow_list(self) -> AllowList:
        """DOWNSTREAM_URLS's prefixes, and PROCESSOR_HTTP_URL's, which the operator named."""
        prefixes = []
        for text in (part.strip() for part in self.DOWNSTREAM_URLS.split(",")):
            if not text:
                continue
            try:
                prefixes.append(Prefix.parse(text))
            except NotAllowed as refused:
                raise ConfigError(f"DOWNSTREAM_URLS: {text!r} {refused}") from None
        own = self.processor_http_prefix
        return AllowList(tuple(prefixes) + ((own,) if own else ()))

    @property
    def downstream_secrets(self) -> dict[str, Secret]:
        """The downstream secrets by name, each with its prefix; a half-given one (a
        value without its prefix, or a prefix without its value) refuses the start."""
        found = {}
        for setting in self.secrets:
            variable = f"{SECRET_VARIABLE}{setting.name}"
            if not SECRET_NAME.fullmatch(setting.name) or setting.name.endswith(SECRET_URL_SUFFIX):
                raise ConfigError(
                    f"{variable}: a secret's NAME is upper-case letters, digits and "
                    f"underscores, not ending in {SECRET_URL_SUFFIX}"
                )
            if not setting.url:
                raise ConfigError(
                    f"{variable} is set without {variable}{SECRET_URL_SUFFIX}, the URL "
                    "prefix it may be sent to"
                )
            if not setting.value:
                raise ConfigError(
                    f"{variable}{SECRET_URL_SUFFIX} is set without {variable}, the secret "
                    "it is the prefix of"
                )
            try:
                prefix = Prefix.parse(setting.url, f"{variable}{SECRET_URL_SUFFIX}")
            except NotAllowed as refused:
                raise ConfigError(f"{variable}{SECRET_URL_SUFFIX} {refused}") from None
            _check_header_value(variable, setting.value)
            found[setting.name] = Secret(setting.name, prefix, setting.value)
        return found

    @property
    def processor_http_secret(self) -> Secret | None:
        """PROCESSOR_HTTP_AUTHORIZATION, bound to PROCESSOR_HTTP_URL's prefix."""
        if not self.PROCESSOR_HTTP_AUTHORIZATION:
            return None
        _check_header_value("PROCESSOR_HTTP_AUTHORIZATION", self.PROCESSOR_HTTP_AUTHORIZATION)
        return Secret(
            "PROCESSOR_HTTP_AUTHORIZATION",
            self.processor_http_prefix,
            self.PROCESSOR_HTTP_AUTHORIZATION,
        )

    @property
    def processor_modules(self) -> frozenset[str]:
        """PROCESSOR_MODULES, and ID_PROCESSOR's module, which the operator named too."""
        listed = {name.strip() for name in self.PROCESSOR_MODULES.split(",") if name.strip()}
        return frozenset({*listed, self.ID_PROCESSOR.partition(":")[0]})

    def flask_settings(self) -> dict:
        settings = asdict(self)
        settings["EXPLICIT_SETTINGS"] = settings.pop("explicit")
        del settings["secrets"]  # as values, with their prefixes, below
        settings["DOWNSTREAM_ALLOW_LIST"] = self.allow_list
        settings["DOWNSTREAM_SECRETS"] = self.downstream_secrets
        settings["PROCESSOR_HTTP_SECRET"] = self.processor_http_secret
        settings["SPREAD_MIN_OPEN_SLOTS"] = self.spread_min_open_slots
        settings["ALLOWED_PROCESSOR_MODULES"] = self.processor_modules
        settings["SERVED_HOSTS"] = frozenset(
            name.strip().lower() for name in self.ALLOWED_HOSTS.split(",") if name.strip()
        )
        settings["SQLALCHEMY_DATABASE_URI"] = _sqlalchemy_url(self.DATABASE_URL)
        settings["SQLALCHEMY_ENGINE_OPTIONS"] = {"connect_args": self._connect_args()}
        return settings

    def _connect_args(self) -> dict:
        # Statements are never prepared: a generic plan cannot match a bound status to
        # the partial indexes on status that claims and reconcile rely on. A connection
        # gives up connecting after the timeout, and TCP keepalives find a peer that
        # vanished (a failed-over host) instead of waiting on it for ever.
        return {
            "prepare_threshold": None,
            "connect_timeout": self.DATABASE_CONNECT_TIMEOUT_SECONDS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            # Data the server never acknowledges (its host failed) fails the connection
            # after this many milliseconds instead of the kernel's quarter of an hour.
            "tcp_user_timeout": 30_000,
        }


def _check_header_value(variable: str, value: str) -> None:
    if not HEADER_VALUE.match(value):
        # The value itself is never repeated: it is a secret.
        raise ConfigError(
            f"{variable} must be a header value of visible ASCII characters (spaces and "
            "tabs inside): no line break, control or non-ASCII character"
        )


def _secrets_in(environ: Mapping[str, str]) -> tuple[SecretSetting, ...]:
    """Every DOWNSTREAM_SECRET_<NAME> and DOWNSTREAM_SECRET_<NAME>_URL of `environ`,
    paired by NAME; an empty one counts as unset."""
    found: dict[str, dict[str, str]] = {}
    for variable, raw in environ.items():
        if not variable.startswith(SECRET_VARIABLE) or not raw.strip():
            continue
        name = variable[len(SECRET_VARIABLE) :]
        part = "value"
        if name.endswith(SECRET_URL_SUFFIX):
            name, part = name[: -len(SECRET_URL_SUFFIX)], "url"
        found.setdefault(name, {})[part] = raw.strip()
    return tuple(SecretSetting(name, **parts) for name, parts in sorted(found.items()))


def stack_file(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("VAR_DIR") or ROOT / "var") / STACK_FILE


def with_stack_addresses(environ: Mapping[str, str]) -> Mapping[str, str]:
    if all(environ.get(name) for name in STACK_ADDRESSES):
        return environ
    try:
        lines = stack_file(environ).read_text().splitlines()
    except OSError:
        return environ
    written = dict(line.split("=", 1) for line in lines if "=" in line)
    unset = {name: written[name] for name in STACK_ADDRESSES if name in written}
    return {**environ, **{name: value for name, value in unset.items() if not environ.get(name)}}


_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _convert(name: str, raw: str, type_name: str):
    kind = type_name.split("|")[0].strip()
    if kind == "bool":
        if raw.lower() not in _BOOLEANS:
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return _BOOLEANS[raw.lower()]
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    return raw
