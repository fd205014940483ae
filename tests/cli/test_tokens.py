"""`flask tokens create`, `list` and `revoke`: a token shown once, stored as a digest."""

import hashlib

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.web import tokens


def create(runner, name: str, scope: str = "read"):
    return runner.invoke(args=["tokens", "create", name, "--scope", scope])


def stored(app) -> list:
    with app.app_context():
        return db.session.execute(
            text("SELECT name, scope, digest, created_at, last_used_at FROM api_tokens")
        ).all()


def test_create_prints_a_new_random_token_once_and_stores_only_its_digest(app, runner):
    first, second = create(runner, "ci", "submit"), create(runner, "grafana")
    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    token = first.stdout.strip()
    assert len(token) >= 43 and token != second.stdout.strip()
    assert "shown only now" in first.output
    rows = {row.name: row for row in stored(app)}
    assert set(rows) == {"ci", "grafana"}
    assert rows["ci"].scope == "submit"
    assert bytes(rows["ci"].digest) == hashlib.sha256(token.encode()).digest()
    assert all(token not in str(value) for value in rows["ci"])


def test_list_shows_name_scope_created_and_last_use_never_the_token(app, runner, client):
    token = create(runner, "ci", "admin").stdout.strip()
    create(runner, "grafana")
    client.get("/users/", headers={"Authorization": f"Bearer {token}"})
    result = runner.invoke(args=["tokens", "list"])
    assert result.exit_code == 0, result.output
    header, ci, grafana = result.output.splitlines()
    assert header.split() == ["name", "scope", "created", "last", "used"]
    assert ci.split()[:2] == ["ci", "admin"] and "never" not in ci
    assert ci.count(" UTC") == 2
    assert grafana.split()[:2] == ["grafana", "read"] and grafana.endswith("never")
    assert token not in result.output
    assert tokens.digest(token).hex() not in result.output


def test_revoke_deletes_the_token_and_an_unknown_name_is_an_error(app, runner):
    create(runner, "ci")
    revoked = runner.invoke(args=["tokens", "revoke", "ci"])
    assert (revoked.exit_code, revoked.output) == (0, "token ci revoked\n")
    assert stored(app) == []
    again = runner.invoke(args=["tokens", "revoke", "ci"])
    assert again.exit_code == 1
    assert "Error: token 'ci' does not exist" in again.output


def test_a_name_is_unique(app, runner):
    create(runner, "ci")
    duplicate = create(runner, "ci", "admin")
    assert duplicate.exit_code == 1
    assert "Error: a token with this name already exists" in duplicate.output
    assert [(row.name, row.scope) for row in stored(app)] == [("ci", "read")]


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "with space", "tab\there", "ümlaut", "a/b", "API_TOKEN"]
)
def test_a_name_outside_the_rules_is_refused(app, runner, name):
    result = create(runner, name)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "token" in result.output
    assert stored(app) == []


def test_the_longest_name_is_taken(app, runner):
    assert create(runner, "a.b_c-" + "x" * 58).exit_code == 0


def test_an_unknown_scope_is_refused(app, runner):
    result = create(runner, "ci", "owner")
    assert result.exit_code == 2
    assert "Invalid value for '--scope'" in result.output
    assert "'owner' is not one of 'read', 'submit', 'admin'" in result.output
    assert stored(app) == []


def test_the_number_of_tokens_is_bounded(app, runner, monkeypatch):
    monkeypatch.setattr(tokens, "MAX_TOKENS", 3)
    for number in range(3):
        assert create(runner, f"client-{number}").exit_code == 0
    refused = create(runner, "one-too-many")
    assert refused.exit_code == 1
    assert "there are 3 tokens already" in refused.output
    assert len(stored(app)) == 3
