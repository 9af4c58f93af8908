"""The import checks of `make lint` can fail, and the client's optional imports stay lazy.

scripts/check_import_cycles.py and the import-linter contracts run on small packages written
to a temporary folder with a circle or a layer breach planted in them; the client's modules
are parsed to show torch and safetensors are imported only inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scripts import check_import_cycles
from scripts.check_import_cycles import Import, find_cycles

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python" / "hessian_client"


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_import_cycles.main puts --path on sys.path; each test gets the path back."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def write_package(root: Path, files: dict[str, str]) -> None:
    """Write ``{"pkg/mod.py": source}`` under ``root``, dedented."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def test_cycle_checker_reports_exactly_the_planted_circle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The circles were of these kinds: a TYPE_CHECKING import one way, a lazy
    # (function-level) import the other. c imports a but is on no circle.
    write_package(
        tmp_path,
        {
            "planted/__init__.py": "",
            "planted/a.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from planted.b import B
                """,
            "planted/b.py": """\
                class B:
                    def a(self):
                        from planted import a
                        return a
                """,
            "planted/c.py": "from planted import a\n",
        },
    )

    status = check_import_cycles.main(["planted", "--path", str(tmp_path)])

    assert status == 1
    [cycle] = find_cycles(["planted"])
    assert cycle.modules == ("planted.a", "planted.b")
    assert cycle.chain == (
        Import("planted.a", "planted.b", ("l.3: from planted.b import B",)),
        Import("planted.b", "planted.a", ("l.3: from planted import a",)),
    )
    assert capsys.readouterr().out == (
        "1 import cycle(s) among planted:\n\n"
        "cycle 1 (2 modules): planted.a, planted.b\n"
        "  planted.a -> planted.b  (l.3: from planted.b import B)\n"
        "  planted.b -> planted.a  (l.3: from planted import a)\n"
    )


def test_cycle_checker_sees_a_package_importing_its_own_importer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The circle import-linter's acyclic_siblings contract cannot see: a package's
    # __init__ and one of its modules (no two siblings), here three modules round.
    write_package(
        tmp_path,
        {
            "selfish/__init__.py": "from selfish.api import run\nVERSION = 1\n",
            "selfish/api.py": "from selfish.core import step\n\ndef run():\n    return step()\n",
            "selfish/core.py": "def step():\n    from selfish import VERSION\n    return VERSION\n",
        },
    )

    assert check_import_cycles.main(["selfish", "--path", str(tmp_path)]) == 1

    [cycle] = find_cycles(["selfish"])
    assert cycle.modules == ("selfish", "selfish.api", "selfish.core")
    assert [(step.importer, step.imported) for step in cycle.chain] == [
        ("selfish", "selfish.api"),
        ("selfish.api", "selfish.core"),
        ("selfish.core", "selfish"),
    ]
    assert "cycle 1 (3 modules): selfish, selfish.api, selfish.core" in capsys.readouterr().out


def test_cycle_checker_passes_a_package_without_circles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_package(
        tmp_path,
        {
            "tidy/__init__.py": "from tidy.top import run\n",
            "tidy/top.py": """\
                from tidy import low

                def run():
                    from tidy.mid import f
                    return f() + low.g()
                """,
            "tidy/mid.py": "from tidy.low import g\n\ndef f():\n    return g()\n",
            "tidy/low.py": "def g():\n    return 1\n",
        },
    )

    assert check_import_cycles.main(["tidy", "--path", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "No import cycles among tidy.\n"


def test_layers_contract_catches_a_type_checking_import_upwards(tmp_path: Path) -> None:
    # As pyproject.toml configures it: TYPE_CHECKING imports count, so a type-only import
    # from the engine up into the api breaks the layers.
    write_package(
        tmp_path,
        {
            "layered/__init__.py": "",
            "layered/api.py": "from layered import engine\n",
            "layered/engine.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from layered.api import Handler
                """,
            "pyproject.toml": """\
                [tool.importlinter]
                root_packages = ["layered"]
                exclude_type_checking_imports = false

                [[tool.importlinter.contracts]]
                name = "api above engine"
                type = "layers"
                containers = ["layered"]
                layers = ["api", "engine"]
                """,
        },
    )
    lint_imports = Path(sys.executable).with_name("lint-imports")

    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1, result.stdout
    assert "api above engine BROKEN" in result.stdout
    assert "layered.engine -> layered.api (l.3)" in result.stdout


def module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names of what a module imports when it is imported.

    Function bodies run later (lazy imports) and ``if TYPE_CHECKING:`` bodies never run, so
    neither counts; class bodies, ``try`` and other ``if`` blocks run at import time and do.
    """
    names: set[str] = set()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        pending.extend(ast.iter_child_nodes(node))
    return names


def test_module_level_imports_sees_only_what_runs_at_import_time() -> None:
    tree = ast.parse(
        textwrap.dedent("""\
            import json
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                import torch
            try:
                import numpy
            except ImportError:
                pass
            class C:
                import httpx
                def f(self):
                    import safetensors
            """)
    )
    assert module_level_imports(tree) == {"json", "typing", "numpy", "httpx"}


def test_client_imports_only_stdlib_httpx_and_numpy_at_module_level() -> None:
    # hessian-client's dependencies are httpx and numpy (clients/python/pyproject.toml);
    # torch and safetensors are extras, imported inside the functions that need them. The
    # client-standalone contract (pyproject.toml) cannot tell a lazy import from a
    # module-level one: this test does.
    allowed = set(sys.stdlib_module_names) | {"httpx", "numpy", "hessian_client"}
    modules = sorted(CLIENT.glob("*.py"))
    assert modules, CLIENT
    imported = {
        path.name: module_level_imports(ast.parse(path.read_text(), str(path))) for path in modules
    }
    assert {name: names - allowed for name, names in imported.items()} == {
        name: set() for name in imported
    }
