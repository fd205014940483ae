"""Entry point for gunicorn (`gunicorn wsgi:app`) and the flask command."""

from service import create_app
from service.core.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    # A missing or malformed setting is the operator's to fix: one line says which.
    raise SystemExit(f"Error: {error}") from None
