"""Weights shipped inside the package, by name: ``<dataset>/<arch>`` (e.g. ``fashion_mnist/resnet20``).

Each entry is an ordinary letkd checkpoint file under ``letkd/weights/`` (``{'model': state_dict,
'config': ..., 'epoch': ...}``, no optimiser state), so ``letkd evaluate FILE`` accepts the file
itself. It is checked against the sha256 recorded here before use and read with
``torch.load(weights_only=True)`` only.

Use: ``teacher.checkpoint: fashion_mnist/resnet20`` in a config, ``letkd evaluate
fashion_mnist/resnet20``, or ``letkd.models.create("resnet20", weights="fashion_mnist")``.
How each file was trained: ``benchmarks/results/teachers/`` (command, log, curve).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["ShippedWeights", "SHIPPED", "is_shipped_name", "shipped", "shipped_path", "resolve_weights_source",
           "for_arch", "UnknownWeightsError"]


@dataclass(frozen=True)
class ShippedWeights:
    """One shipped checkpoint: what it is, where it lives, its hash and its measured accuracy."""

    arch: str                  # model name in the zoo
    dataset: str               # data set it was trained on (a ``data.name``)
    file: str                  # path under letkd/weights/
    sha256: str
    test_acc: float            # top-1 on the data set's full test set (%), as `letkd evaluate` reports it
    num_classes: int
    in_channels: int
    record: str                # where the training command, log and curve are committed

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.arch}"


SHIPPED: dict[str, ShippedWeights] = {w.name: w for w in (
    ShippedWeights(arch="resnet20", dataset="fashion_mnist", file="fashion_mnist/resnet20.pt",
                   sha256="9949390ccce96c78e5f0c1441c8c9ca85bbfbb92c187763cc3632e50123e0e93", test_acc=93.97, num_classes=10, in_channels=1,
                   record="benchmarks/results/teachers/fashion_mnist_resnet20.md"),
)}


class UnknownWeightsError(KeyError, ValueError):
    """A ``<dataset>/<arch>`` name that is not shipped (the message lists the ones that are)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _available() -> str:
    return ", ".join(f"{n} ({w.test_acc:.2f} %)" for n, w in SHIPPED.items())


def is_shipped_name(source: str | os.PathLike) -> bool:
    """Whether ``source`` names shipped weights rather than a file: ``<dataset>/<arch>`` with no
    file of that name on disk (a real file always wins)."""
    s = str(source)
    return s in SHIPPED and not Path(s).exists()


def shipped(name: str) -> ShippedWeights:
    """The entry called ``name``; an unknown name is an error listing the available ones."""
    if name not in SHIPPED:
        raise UnknownWeightsError(f"no shipped weights called {name!r}; available: {_available()}. "
                                  f"For your own weights give a checkpoint file path instead")
    return SHIPPED[name]


def for_arch(arch: str, dataset: str) -> ShippedWeights:
    """The entry for model ``arch`` trained on ``dataset`` (``create(arch, weights=dataset)``)."""
    name = f"{dataset}/{arch}"
    if name not in SHIPPED:
        raise UnknownWeightsError(f"no shipped {dataset!r} weights for model {arch!r}; available: {_available()}")
    return SHIPPED[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shipped_path(name: str) -> Path:
    """The file of shipped weights ``name``, after checking its sha256 (an error names both hashes)."""
    w = shipped(name)
    path = Path(str(resources.files("letkd") / "weights" / w.file))
    if not path.is_file():
        raise FileNotFoundError(f"shipped weights {name!r}: file {path} is missing from the installed package; "
                                f"reinstall letkd (pip install -e . from the repository)")
    digest = _sha256(path)
    if digest != w.sha256:
        raise ValueError(f"shipped weights {name!r}: {path} has sha256 {digest}, expected {w.sha256}; the file is "
                         f"damaged or was replaced. Reinstall letkd (or `git checkout -- {w.file}` in the repository)")
    return path


def resolve_weights_source(source: str | os.PathLike) -> Path:
    """A weights/checkpoint argument as a file: a shipped name becomes its checked file, anything
    else is taken as a path. A ``<dataset>/<arch>``-looking name that is neither a file nor shipped
    is an error listing the shipped names."""
    s = str(source)
    if is_shipped_name(s):
        return shipped_path(s)
    p = Path(s)
    if not p.exists() and p.suffix == "" and s.count("/") == 1:
        raise UnknownWeightsError(f"{s!r} is neither a file nor the name of shipped weights; available: {_available()}")
    return p
