"""Rules of the code that a reader relies on, checked by reading the code itself."""

import ast
import re
import sys
from pathlib import Path

from ..processes import ROOT

STATUSES = "received|planning|scheduled|running|pending|retrying|done|failed|cancelled"
SQL_STATUS_LITERAL = re.compile(rf"'({STATUSES})'")

# The layers of service/, lowest first: a package may import only packages of lower
# layers (and itself). Packages of one layer know nothing of each other.
LAYERS = [
    {"core"},
    {"processors"},
    {"limits", "users"},
    {"jobs"},
    {"tasks"},
    {"planning"},
    {"dispatch"},
    {"ops", "retention"},
    {"web"},
    {"cli"},
    {"app"},  # service/__init__.py: the app factory
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
# Only the web layer speaks HTTP: a request's state, HTTP errors, aborts.
HTTP_NAMES = {("flask", "request"), ("flask_smorest", "abort")}
HTTP_MODULES = ("werkzeug.exceptions",)
PLANNER = "service.planning.planner"
# What a job entry point needs besides the service: an app context.
ENTRY_POINT_IMPORTS = {"service", "workers", "flask", "__future__"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str | None:
    """The layer's package that a module of service/ belongs to."""
    parts = module.split(".")
    if parts[0] != "service":
        return None
    return "app" if len(parts) == 1 else parts[1]


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import of a file, at any depth."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def imported_module(module: str, name: str | None, root: Path = ROOT) -> str:
    """`from a.b import c` names module a.b.c when c is a module of this tree."""
    if name and (_file_of(f"{module}.{name}", root) is not None):
        return f"{module}.{name}"
    return module


def _file_of(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def sources(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / folder).rglob("*.py"))


def where(path: Path, line: int, root: Path = ROOT) -> str:
    return f"{path.relative_to(root)}:{line}"


def layer_violations(root: Path = ROOT) -> list[str]:
    """Every import of service/ that runs up the layers, across a layer, or to workers/."""
    found = []
    for path in sources("service", root):
        own = package_of(module_name(path, root))
        for module, name, line in imports_of(path, root):
            target = imported_module(module, name, root)
            if target.split(".")[0] == "workers":
                found.append(f"{where(path, line, root)}: service/ imports {target}")
                continue
            other = package_of(target)
            if other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                found.append(f"{where(path, line, root)}: {own} imports {target}")
    return found


def test_every_package_of_service_has_a_layer():
    packages = {package_of(module_name(path)) for path in sources("service")}
    assert packages <= set(RANK), packages - set(RANK)


def test_imports_run_down_the_layers_and_never_from_service_to_workers():
    assert layer_violations() == []


def test_workers_hold_only_entry_points_that_call_service():
    for path in sources("workers"):
        for module, name, line in imports_of(path):
            target = imported_module(module, name)
            top = target.split(".")[0]
            assert top in ENTRY_POINT_IMPORTS or top in sys.stdlib_module_names, (
                f"{where(path, line)}: a job entry point imports {target}"
            )


def test_only_the_web_layer_speaks_http():
    found = [
        f"{where(path, line)}: {module} {name or ''}"
        for path in sources("service")
        if package_of(module_name(path)) != "web"
        for module, name, line in imports_of(path)
        if (module, name) in HTTP_NAMES or module.startswith(HTTP_MODULES)
    ]
    assert found == []


def test_the_planner_imports_only_the_standard_library():
    path = ROOT.joinpath(*PLANNER.split(".")).with_suffix(".py")
    outside = [
        module
        for module, _, _ in imports_of(path)
        if module.split(".")[0] not in sys.stdlib_module_names and module != "__future__"
    ]
    assert outside == []


def test_the_checker_finds_imports_up_across_and_back(tmp_path):
    files = {
        "service/__init__.py": "from service import web\n",
        "service/core/__init__.py": "",
        "service/core/models.py": "def f():\n    from ..web import views\n",
        "service/limits/__init__.py": "",
        "service/limits/store.py": "from service.users.store import find\n",
        "service/users/__init__.py": "",
        "service/users/store.py": "from service.core import models\n",
        "service/web/__init__.py": "",
        "service/web/views.py": "from workers.slots import run_slot\nfrom ..core import models\n",
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert layer_violations(tmp_path) == [
        "service/core/models.py:2: core imports service.web.views",
        "service/limits/store.py:1: limits imports service.users.store",
        "service/web/views.py:1: service/ imports workers.slots",
    ]


def test_no_status_is_written_by_hand_in_sql():
    # Statuses are enums bound as parameters; only the schema (models.py, the
    # migrations) spells them out, in constraints and partial indexes.
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in [*sources("service"), *sources("workers")]
        if path.name != "models.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if SQL_STATUS_LITERAL.search(line)
    ]
    assert found == []


def test_the_public_paths_of_jobs_and_processors_still_lead_to_their_code():
    # Stored jobs, limit rows and processors written elsewhere name these paths.
    from rq.utils import import_attribute

    from service.core.config import HTTP_PROCESSOR, RECORD_USER
    from service.jobs import PLAN_RETRIES_JOB, PLAN_TASK_JOB, SLOT_JOB
    from service.processors import builtin, contract
    from service.processors.contract import load_processor

    assert (SLOT_JOB, PLAN_TASK_JOB, PLAN_RETRIES_JOB) == (
        "workers.slots.run_slot",
        "workers.planning.plan_task",
        "workers.planning.plan_retries",
    )
    assert all(callable(import_attribute(path)) for path in (SLOT_JOB, PLAN_TASK_JOB))
    assert load_processor(RECORD_USER) is builtin.record_user
    assert load_processor(HTTP_PROCESSOR) is builtin.http_request
    processors = load_processor("workers.processors:per_id").__module__
    assert processors == contract.__name__
    assert import_attribute("workers.processors.Failure") is contract.Failure
