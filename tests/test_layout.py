"""The package's layout shows its pipeline: stage subpackages that import only the stages below them, no
import circles, few top-level modules, and a docstring in each stage that says where to start reading."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mla_convert"
# the faces, and the low modules every stage reads (options, profiles, errors, hooks, progress)
FACES = {"api", "cli", "options", "profiles", "job", "errors", "hooks", "progress"}
MAX_TOP_LEVEL = 8  # modules beside __init__.py
TESTS = ROOT / "tests"
MAX_TEST_LINES = 500


def lint_imports() -> subprocess.CompletedProcess[str]:
    """import-linter's contracts in pyproject.toml: the stage layers, and no circles in any package."""
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    return subprocess.run([found, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_stages_import_only_the_stages_below_them_and_no_module_imports_itself_back() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


CLIMBS = {
    "at run time": "\n\ndef _climb():\n    from ..report import report  # noqa: F401\n",
    "for type checking only": "\nimport typing\n\nif typing.TYPE_CHECKING:\n    from ..report import report\n",
}


@pytest.mark.parametrize("climb", CLIMBS, ids=list(CLIMBS))
def test_the_contracts_catch_an_import_that_climbs_back_up(tmp_path: Path, climb: str) -> None:
    """The check is live: in a copy of the package where the math imports the report (at run time, or only
    for type checking), it fails and says so."""
    copy = tmp_path / "copy"
    shutil.copytree(PACKAGE, copy / "mla_convert", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    exact = copy / "mla_convert" / "mla" / "exact.py"
    exact.write_text(exact.read_text() + CLIMBS[climb])
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert found is not None
    result = subprocess.run(
        [found, "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)},
    )
    assert result.returncode != 0
    assert "mla_convert.mla is not allowed to import mla_convert.report" in result.stdout


def test_few_modules_at_the_top_level() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert top <= FACES and len(top) <= MAX_TOP_LEVEL, sorted(top - FACES)


def test_each_stage_says_what_it_takes_and_gives_and_where_to_start() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.parent.name}/__init__.py has no docstring"
        named = re.findall(r"`([\w/]+\.py)`", doc)
        assert named, f"{init.parent.name}/__init__.py names no module to open first"
        for module in named:
            where = init.parent / module if "/" not in module else PACKAGE / module
            assert where.is_file(), f"{init.parent.name}/__init__.py names {module}, which does not exist"


def test_what_the_hooks_receive_has_every_attribute_their_views_name() -> None:
    """hooks.py types its callbacks by Protocols (it sits below the stages); the stages' classes fit them."""
    import dataclasses

    from mla_convert import hooks
    from mla_convert.conversion.driver import LayerStats
    from mla_convert.plan.plan import Plan
    from mla_convert.plan.serving import Verdict
    from mla_convert.train.distill import StepInfo

    views = {hooks.PlanView: Plan, hooks.VerdictView: Verdict, hooks.LayerView: LayerStats, hooks.StepView: StepInfo}
    for view, given in views.items():
        named = {name for name, member in vars(view).items() if isinstance(member, property)}
        fields = {f.name for f in dataclasses.fields(given)}
        assert named and named <= fields, (view.__name__, sorted(named - fields))


def test_test_files_share_through_helpers_and_conftest_and_stay_short() -> None:
    """No test file imports another (shared builders live in tests/helpers.py, shared fixtures in conftest.py),
    none imports the job behind the API (they call mla_convert.convert, dry_run or the CLI), and none is long."""
    for path in sorted(TESTS.glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= MAX_TEST_LINES, f"{path.name} is over {MAX_TEST_LINES} lines: split it"
        modules = []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                modules += [f"{base}.{alias.name}" if base else alias.name for alias in node.names] + [base]
        assert not [m for m in modules if any(part.startswith("test_") for part in m.split("."))], path.name
        assert not [m for m in modules if m == "mla_convert.job" or m.startswith("mla_convert.job.")], path.name
