"""Your own models from the command line: ``letkd distill CONFIG --import my_pkg.models``.

``--import`` imports Python modules the user names on the command line — it runs the user's own
code, as ``python -c "import my_pkg.models"`` would. Such a module registers models with
:func:`letkd.models.register`, and configs then use those names like any zoo name. A config file
never triggers an import: configs stay data (``model.name`` only looks names up).

A name is a module path (``my_pkg.models``, found on ``sys.path``, which here starts with the
current directory, as for ``python -m``) or a ``.py`` file path (``./my_models.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["import_modules", "UserImportError"]


class UserImportError(ImportError, ValueError):
    """A module named by ``--import`` could not be found (the message says where it was looked for)."""


def _from_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserImportError(f"--import {str(path)!r}: no such file")
    name = f"letkd_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserImportError(f"--import {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_modules(names: list[str]) -> list[ModuleType]:
    """Import each module of ``names`` (module paths or ``.py`` files), in order; return them.

    Errors raised by the user's code propagate unchanged; a module that cannot be found is a
    :class:`UserImportError` naming the search path."""
    done = []
    for name in names:
        if name.endswith(".py") or os.sep in name or "/" in name:
            done.append(_from_file(Path(name)))
            continue
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        try:
            done.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the user's module itself imports something missing
            raise UserImportError(f"--import {name}: no module named {e.name!r} (looked in the current directory "
                                  f"{cwd} and on PYTHONPATH / sys.path); give a module path such as my_pkg.models "
                                  f"or a file such as ./my_models.py") from None
    return done
