"""Settings, read once from the environment, converted and checked."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the process must not start."""


def _sqlalchemy_url(url: str) -> str:
    # Operators write plain postgresql:// URLs; SQLAlchemy needs the driver named.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@dataclass(frozen=True)
class Config:
    """Every setting of the service; README.md documents each one."""

    DATABASE_URL: str = ""
    REDIS_URL: str = ""
    RPM: int = 120
    PLAN_LEAD_SECONDS: float = 2.0
    SLOT_SECONDS: int = 60
    WINDOW_SLOTS: int = 15
    MAX_ATTEMPTS: int = 3
    ID_PROCESSOR: str = "workers.processors:record_user"
    API_TOKEN: str | None = None
    MAX_IDS_PER_TASK: int = 10_000_000
    MAX_CONTENT_LENGTH: int = 16 * 1024 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(field.name, "").strip()
            if raw:
                values[field.name] = _convert(field.name, raw, field.type)
        return cls(**values)

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
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.PLAN_LEAD_SECONDS < 0:
            raise ConfigError("PLAN_LEAD_SECONDS must not be negative")
        if ":" not in self.ID_PROCESSOR:
            raise ConfigError("ID_PROCESSOR must be a 'module:function' path")

    def flask_settings(self) -> dict:
        settings = asdict(self)
        settings["SQLALCHEMY_DATABASE_URI"] = _sqlalchemy_url(self.DATABASE_URL)
        return settings


def _convert(name: str, raw: str, type_name: str):
    kind = type_name.split("|")[0].strip()
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    return raw
