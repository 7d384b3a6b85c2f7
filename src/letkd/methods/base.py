"""The one API every distillation method implements, and the method registry.

A method is a :class:`Distiller`: an ``nn.Module`` that holds the student, a frozen teacher in
eval mode (never updated, never wrapped in DDP) and the method's own extra modules
(regressors, embeddings, KD layers ...). The trainer knows nothing about methods: it calls
``forward_train(images, labels, **batch)``, sums the returned loss dict, and logs each term.

Register a method with::

    @register("kd", KDParams)
    class KD(Distiller): ...

where ``KDParams`` is a dataclass of the method's hyper-parameters; the ``method:`` section of
a config is validated against it (unknown keys are errors naming the valid ones).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from letkd.models.taps import attach_capture, feature_shapes, resolve

__all__ = ["Context", "Distiller", "register", "create", "names", "params_class", "REGISTRY"]


@dataclass
class Context:
    """What a method may need to know about the run when it is built."""

    num_classes: int
    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    num_train: int = 0
    epochs: int = 1
    student_arch: str | None = None
    teacher_arch: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)


class Distiller(nn.Module):
    """Base class: student + frozen teacher + the method's own trainable modules.

    Subclasses implement :meth:`forward_train`. Helpers provided here:

    * :meth:`tap` / :meth:`teacher_tap` attach persistent capture hooks by tap name or module
      path; the features of the last forward are in ``self.s_feats`` / ``self.t_feats``.
    * :meth:`teacher_forward` runs the teacher once per batch under ``torch.no_grad()``
      (not ``inference_mode``: its outputs become loss targets that autograd must save).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, ctx: Context) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.ctx = ctx
        for m in (student, teacher):  # where taps without a table are resolved (models.autotaps)
            if m is not None and getattr(m, "letkd_input_shape", None) is None:
                m.letkd_input_shape = ctx.input_shape
        self._s_cap = None
        self._t_cap = None
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()

    # -- taps ---------------------------------------------------------------------------
    def tap(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """Capture student features at the given taps; returns their shapes (C, H, W)."""
        paths = {n: resolve(self.student, n, self.ctx.student_arch) for n in names}
        shapes = feature_shapes(self.student, paths, self.ctx.input_shape)
        if self._s_cap is not None:
            self._s_cap.remove()
            paths = {**self._s_paths, **paths}
        self._s_paths = paths
        self._s_cap = attach_capture(self.student, paths)
        return shapes

    def teacher_tap(self, names: list[str]) -> dict[str, tuple[int, ...]]:
        """Capture teacher features at the given taps; returns their shapes (C, H, W)."""
        if self.teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher: set teacher.name")
        paths = {n: resolve(self.teacher, n, self.ctx.teacher_arch) for n in names}
        shapes = feature_shapes(self.teacher, paths, self.ctx.input_shape)
        if self._t_cap is not None:
            self._t_cap.remove()
            paths = {**self._t_paths, **paths}
        self._t_paths = paths
        self._t_cap = attach_capture(self.teacher, paths)
        return shapes

    def tap_pair(self, tap: str, teacher_tap: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Capture one student tap and the teacher's counterpart (the same name when
        ``teacher_tap`` is empty, stored as ``self.t_name``); returns both feature shapes."""
        self.t_name = teacher_tap or tap
        return self.tap([tap])[tap], self.teacher_tap([self.t_name])[self.t_name]

    @property
    def s_feats(self) -> dict[str, torch.Tensor]:
        return self._s_cap.features if self._s_cap is not None else {}

    @property
    def t_feats(self) -> dict[str, torch.Tensor]:
        return self._t_cap.features if self._t_cap is not None else {}

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits for ``images`` (frozen, eval mode, no grad); features land in t_feats."""
        if self.teacher is None:
            raise ValueError(f"method {type(self).__name__} needs a teacher: set teacher.name")
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images)

    # -- the API --------------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, labels: torch.Tensor, **batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(student_logits, {loss_name: scalar})``. ``batch`` may hold ``index``
        (dataset indices of the samples) and ``epoch`` (1-based current epoch)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Inference: the deployable student alone."""
        return self.deployable()(images)

    def prepare(self, train_data: Any, run_dir: Any = None) -> None:
        """Optional one-off work before training (e.g. letKD fits its teacher targets)."""

    def deployable(self) -> nn.Module:
        """The model that is evaluated and exported: the student plus whatever it keeps at
        inference (KD layers, SimKD's projector and reused teacher classifier)."""
        return self.student

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode, always
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that the optimiser updates: everything except the teacher."""
        teacher_ids = {id(p) for p in self.teacher.parameters()} if self.teacher is not None else set()
        return [p for p in self.parameters() if id(p) not in teacher_ids and p.requires_grad]

    def compile_hot_paths(self) -> None:
        """``train.compile=kd_layers``: ``torch.compile`` the method's own per-step work. Only
        methods with KD layers have such a path (:class:`letkd.methods.letkd.LetKD`)."""
        raise ValueError(f"train.compile=kd_layers compiles the KD layers and template losses of letkd1, "
                         f"letkd2 and quest; method {type(self).__name__} has none — set train.compile=none")

    def extra_modules(self) -> dict[str, nn.Module]:
        """The method's own trainable modules (not student, not teacher), for reporting."""
        return {n: m for n, m in self.named_children() if n not in ("student", "teacher")}


REGISTRY: dict[str, tuple[type[Distiller], type]] = {}


def register(name: str, params: type) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: register a Distiller subclass under ``name`` with its params dataclass."""
    if not dataclasses.is_dataclass(params):
        raise TypeError("params must be a dataclass")

    def deco(cls: type[Distiller]) -> type[Distiller]:
        if name in REGISTRY and REGISTRY[name][0] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        REGISTRY[name] = (cls, params)
        cls.method_name = name
        return cls

    return deco


def names() -> list[str]:
    """Registered method names."""
    _load_builtin()
    return sorted(REGISTRY)


def params_class(name: str) -> type:
    _load_builtin()
    if name not in REGISTRY:
        raise KeyError(f"unknown method {name!r}; valid methods: {sorted(REGISTRY)}")
    return REGISTRY[name][1]


def make_params(name: str, values: dict[str, Any]) -> Any:
    """Build the params dataclass of ``name`` from a dict, naming unknown keys and bad types."""
    from letkd.config import build_dataclass

    return build_dataclass(params_class(name), values, prefix="method")


def create(name: str, student: nn.Module, teacher: nn.Module | None, ctx: Context,
           params: Any = None) -> Distiller:
    """Build the registered method ``name``. ``params`` is its params dataclass or a dict."""
    cls, pcls = REGISTRY[name] if name in REGISTRY else (None, None)
    if cls is None:
        _load_builtin()
        if name not in REGISTRY:
            raise KeyError(f"unknown method {name!r}; valid methods: {sorted(REGISTRY)}")
        cls, pcls = REGISTRY[name]
    if params is None:
        params = pcls()
    elif isinstance(params, dict):
        params = make_params(name, params)
    return cls(student, teacher, ctx, params)


def _load_builtin() -> None:
    import letkd.methods  # noqa: F401  (registers the built-in methods on import)
