"""Distillation methods, one file each, all on the :class:`~letkd.methods.base.Distiller` API.

Every module in this package is imported on first use so its ``@register`` runs; a user adds a
method by registering it the same way from their own code.
"""
from __future__ import annotations

import importlib
import pkgutil

from letkd.methods.base import REGISTRY, Context, Distiller, create, make_params, names, params_class, register

__all__ = ["REGISTRY", "Context", "Distiller", "create", "make_params", "names", "params_class", "register"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base",) and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
