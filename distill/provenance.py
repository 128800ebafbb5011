"""Provenance: what produced a result, as one fingerprint that every cache and run is keyed by.

A result is reusable only if it was made from the same inputs, with the same settings, by the
same code. ``fingerprint`` hashes the three; ``code_fingerprint`` hashes the source of the
project's own code that computes a result: the *import closure* of an entry module within the
project's packages (``distill``, ``tasks``), found by reading the source with ``ast`` — every
``import``/``from ... import`` anywhere in a file, lazy imports inside functions included, so
the closure over-approximates what can run, never under-approximates it. Third-party code is
not hashed (its version is the environment's, pinned by the install).

The same closure gives ``dvc.yaml`` its code deps (``tests/unit/test_provenance.py`` checks
them), so a change that makes DVC re-run a stage also changes the keys of the caches the
stage reads: a training run of other code is never resumed, labels of another labeler are
never reused, a calibration point of another training loop is run again.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("distill", "tasks")


def module_path(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a dotted module name under ``root`` (a package's ``__init__.py``),
    or None when it is not a file of the project."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Dotted names a source file imports (anywhere in it), relative imports resolved; for
    ``from a import b`` both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def with_parents(module: str) -> list[str]:
    """``a.b.c`` → ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__``."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(modules: Iterable[str], root: Path = PROJECT_ROOT,
                   packages: Iterable[str] = PROJECT_PACKAGES,
                   exclude: Iterable[str] = ()) -> list[str]:
    """The project files (paths relative to ``root``, sorted) that the entry ``modules`` import,
    directly or not, within ``packages``. ``exclude``: modules not followed (their file is not
    in the closure), for code a caller argues cannot change its result."""
    packages, skip = tuple(packages), set(exclude)
    seen: set[str] = set()
    files: set[str] = set()
    pending = [m for entry in modules for m in with_parents(entry)]
    for entry in modules:
        if module_path(entry, root) is None or entry.split(".")[0] not in packages:
            raise ValueError(f"provenance: module {entry!r} is not a file of the project's packages "
                             f"({', '.join(packages)}) under {root}")
    while pending:
        module = pending.pop()
        if module in seen or module in skip or module.split(".")[0] not in packages:
            continue
        seen.add(module)
        path = module_path(module, root)
        if path is None:
            continue  # ``from pkg import name``: ``pkg.name`` is a function or class, not a module
        files.add(path.relative_to(root).as_posix())
        for name in imported_modules(path, module):
            pending.extend(with_parents(name))
    return sorted(files)


@functools.lru_cache(maxsize=None)
def _code_fingerprint(modules: tuple[str, ...], exclude: tuple[str, ...], root: str,
                      packages: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for rel in import_closure(modules, Path(root), packages, exclude):
        digest.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def code_fingerprint(*modules: str, exclude: Iterable[str] = (), root: Path = PROJECT_ROOT,
                     packages: Iterable[str] = PROJECT_PACKAGES) -> str:
    """Hash of the file names and contents of ``import_closure(modules)``: changes with any
    byte of the project code those modules can run (computed once per process)."""
    return _code_fingerprint(tuple(sorted(modules)), tuple(sorted(exclude)), str(root),
                             tuple(packages))


def fingerprint(inputs: Any = None, settings: Any = None, code: str = "") -> str:
    """One hash of what produced a result: its ``inputs`` (content hashes), its ``settings``
    and the ``code`` fingerprint of what computed it (all JSON-serialisable)."""
    payload = json.dumps({"inputs": inputs, "settings": settings, "code": code}, sort_keys=True,
                         default=_plain)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _plain(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself (dataclasses, paths); anything else is an error
    rather than a silent ``str()``, which could hide a value from the key."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"provenance: cannot fingerprint a {type(value).__name__} ({value!r})")
