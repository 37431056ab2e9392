"""numba's on-disk cache for functions that inline code from other modules.

numba keys a cached function by the source of its own file only, but the machine code
of the batch loop also holds the helpers it inlines (lb/datapath/*.py, lb/jhash.py) and
the constants it reads (lb/constants.py): a change there alone would leave the cache
serving the old code. :func:`cached_njit` keys the cache by the source of the function's
module *and* of every ``lb`` module it imports, directly or not (absolute imports,
found in the source text), so any such change compiles afresh.

The cache lives where numba puts it by default: ``__pycache__`` beside the module
(``NUMBA_CACHE_DIR`` if set; a user-wide directory if ``__pycache__`` is not writable).
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numba as nb
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    InTreeCacheLocator,
    UserProvidedCacheLocator,
    UserWideCacheLocator,
)

_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the lb package
_PACKAGE = "lb"


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` of the lb package, None for a non-module."""
    base = _ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path) -> set[str]:
    """Names of the lb modules that ``path`` imports (``import lb.x``, ``from lb.x import
    y``: lb.x, and lb.x.y when that is a module). Packages imported on the way (lb,
    lb.datapath) are not counted: their own code is not what the importer uses."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if (n == _PACKAGE or n.startswith(_PACKAGE + "."))
            and _module_file(n) is not None and _module_file(n).name != "__init__.py"}


def dependency_files(path: Path) -> list[Path]:
    """``path`` and the source files of every lb module it imports, directly or not."""
    seen, todo = {path.resolve()}, [path.resolve()]
    while todo:
        for name in _imported_modules(todo.pop()):
            dep = _module_file(name).resolve()
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return sorted(seen)


def source_digest(path: Path) -> str:
    """A digest of the source of ``path`` and of the lb modules it imports."""
    h = hashlib.sha256()
    for dep in dependency_files(path):
        h.update(str(dep.relative_to(_ROOT)).encode() + b"\0" + dep.read_bytes() + b"\0")
    return h.hexdigest()


class _DependencyStamp:
    def get_source_stamp(self) -> str:
        return source_digest(Path(self._py_file))


class _UserProvided(_DependencyStamp, UserProvidedCacheLocator):
    pass


class _InTree(_DependencyStamp, InTreeCacheLocator):
    pass


class _UserWide(_DependencyStamp, UserWideCacheLocator):
    pass


class _Impl(CompileResultCacheImpl):
    _locator_classes = [_UserProvided, _InTree, _UserWide]


class _DependencyCache(FunctionCache):
    _impl_class = _Impl


def cached_njit(fn=None, **options):
    """``numba.njit(**options)`` with the on-disk cache keyed as the module doc says."""
    def wrap(f):
        dispatcher = nb.njit(**options)(f)
        dispatcher._cache = _DependencyCache(f)  # what enable_caching() does, our class
        return dispatcher

    return wrap(fn) if fn is not None else wrap
