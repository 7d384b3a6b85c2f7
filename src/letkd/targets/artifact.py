"""The targets artifact: one file with the offline teacher statistics and their metadata.

Format (a ``torch.save``d dict of tensors and plain data, read with ``weights_only=True``)::

    {"format": "letkd-targets", "format_version": 1,
     "meta": {teacher_arch, teacher_fingerprint, penult_path, inter_path, penult_pool,
              inter_pool, num_classes, k_penult, k_sub, lda_dim, kmeans_iters, max_samples,
              seed, dataset, num_train, train_subset, tau, library_version, created, ...},
     "penult": {"centroids": K×C} | None,                                   (Alg. 1)
     "inter": {"mean": C, "W": C×d, "eigenvalues": d, "centres": nc×K_sub×d,
               "prototypes": (nc·K_sub)×d, "empty": (nc·K_sub) bool,
               "counts": (nc·K_sub)², "S": (nc·K_sub)²} | None,            (Alg. 2)
     "timings": {pass name: seconds}, "num_samples": {...}}

Writes are atomic (temp file in the same folder, fsync, ``os.replace``); a stale or foreign
file is detected by comparing metadata field by field (:func:`load_targets`).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from letkd.engine.checkpoint import save_atomic

__all__ = ["FORMAT", "FORMAT_VERSION", "save_targets", "load_targets", "meta_mismatches", "teacher_fingerprint"]

FORMAT = "letkd-targets"
FORMAT_VERSION = 1


def save_targets(path: str | os.PathLike, targets: Mapping[str, Any]) -> Path:
    """Write ``targets`` (the dict of :func:`letkd.targets.fit.fit_targets`) atomically."""
    path = Path(path)
    save_atomic({"format": FORMAT, "format_version": FORMAT_VERSION, **dict(targets)}, path)
    return path


def _norm(v: Any) -> Any:
    """Compare tuples and lists alike (YAML gives lists, code gives tuples)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def meta_mismatches(file_meta: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per field of ``expected`` whose value in ``file_meta`` differs (or is absent)."""
    out = []
    for key, want in expected.items():
        if key not in file_meta:
            out.append(f"{key}: file has no value, this run has {want!r}")
        elif _norm(file_meta[key]) != _norm(want):
            out.append(f"{key}: file has {file_meta[key]!r}, this run has {want!r}")
    return out


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    picked = [line for line in lines if "Unsupported" in line] or lines
    return picked[0].strip().split(". ")[0][:300] if picked else "no detail"


def load_targets(path: str | os.PathLike, expected_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a targets artifact (``weights_only=True``) and check its metadata.

    Raises FileNotFoundError if absent; ValueError naming the file if it is truncated,
    corrupted or not a targets artifact; ValueError naming every differing field (with both
    values) if ``expected_meta`` does not match the file's metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"targets artifact {path} does not exist (create it with `letkd fit-targets`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a class: never executed
        if "weights only" not in str(e).lower():  # e.g. "invalid load key": garbage, not a refusal
            raise ValueError(f"targets artifact {path} ({path.stat().st_size} bytes) is truncated or corrupted and "
                             f"cannot be read (UnpicklingError: {_first_line(e)}); delete it and fit the targets "
                             f"again (`letkd fit-targets`)") from None
        raise ValueError(f"targets artifact {path} contains pickled Python objects that are not plain tensors/data; "
                         f"it was refused (loading it could execute code). Delete it and fit the targets again "
                         f"(`letkd fit-targets`). Detail: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any reader failure means an unusable file
        raise ValueError(f"targets artifact {path} ({path.stat().st_size} bytes) is truncated or corrupted and "
                         f"cannot be read ({type(e).__name__}: {_first_line(e)}); delete it and fit the targets "
                         f"again (`letkd fit-targets`)") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("meta"), dict):
        raise ValueError(f"{path} is not a letkd targets artifact (no '{FORMAT}' format marker / meta)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"targets artifact {path} has format version {obj.get('format_version')}, "
                         f"this letkd reads version {FORMAT_VERSION}; fit the targets again")
    if expected_meta:
        bad = meta_mismatches(obj["meta"], expected_meta)
        if bad:
            raise ValueError(f"targets artifact {path} was made for another setting:\n  " + "\n  ".join(bad)
                             + "\nfit the targets again (or point method.targets to a matching file)")
    return obj


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """Fingerprint of a teacher's weights: ``letkd.models.weights.fingerprint(state_dict)`` when
    the model zoo provides it, else a SHA-256 over the names, shapes, dtypes and bytes of the
    state_dict tensors (sorted by name)."""
    sd = model.state_dict()
    try:
        from letkd.models.weights import fingerprint  # the zoo's canonical fingerprint
    except ImportError:
        fingerprint = None
    if fingerprint is not None:
        return str(fingerprint(sd))
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
