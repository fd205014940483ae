"""Rules of the code that a reader relies on."""

import re

from .processes import ROOT

STATUSES = "received|planning|scheduled|running|pending|retrying|done|failed|cancelled"
SQL_STATUS_LITERAL = re.compile(rf"'({STATUSES})'")


def test_no_status_is_written_by_hand_in_sql():
    # Statuses are enums bound as parameters; only the schema (models.py, the
    # migrations) spells them out, in constraints and partial indexes.
    sources = [*(ROOT / "service").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sources
        if path.name != "models.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if SQL_STATUS_LITERAL.search(line)
    ]
    assert found == []
