"""Typed experiment configuration: YAML files + ``key.sub=value`` overrides, validated.

Configs are data: YAML is read with ``yaml.safe_load`` (no tags that build objects or run
code). A file may name other files to start from with ``inherit: [relative/path.yaml, ...]``;
later files and then command-line overrides win, key by key. Unknown keys are errors that name
the valid keys; values are checked for type and range.

Sections: ``data``, ``model`` (the network being trained; the student when distilling),
``teacher``, ``method`` (``name`` + the method's own parameters, validated by the method's
params dataclass), ``train``, ``run``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "TeacherConfig", "TrainConfig", "RunConfig",
    "Config", "load", "from_dict", "to_dict", "parse_overrides", "build_dataclass",
]


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to change."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"          # fashion_mnist | cifar100 | tiny_imagenet | imagenet | image_folder
    root: str = "data"                   # where datasets are looked for (and downloaded to)
    train_subset: int = 0                # >0: use N class-balanced training images
    test_subset: int = 0                 # >0: use N class-balanced test images
    subset_seed: int = 0
    augment: str = "auto"                # auto (the dataset's recipe) | none | crop | crop_flip | rotate_flip | imagenet
    num_workers: int = 4                 # DataLoader workers (ImageNet-scale data only)
    download: bool = True                # try torchvision download where there is internet
    train_dir: str = ""                  # image_folder: folder of class sub-folders for training
    test_dir: str = ""                   # image_folder: folder of class sub-folders for testing
    image_size: int = 0                  # image_folder: resize to this (0: keep / dataset default)


@dataclass
class ModelConfig:
    name: str = "resnet20"
    checkpoint: str = ""                 # optional initial weights
    pretrained: str = ""                 # torchvision weights enum, e.g. ResNet18_Weights.IMAGENET1K_V1


@dataclass
class TeacherConfig:
    name: str = ""                       # empty: no teacher (train-teacher, vanilla)
    checkpoint: str = ""                 # RepDistiller {'model': sd}, letkd checkpoint, or a plain state_dict
    pretrained: str = ""                 # torchvision weights enum instead of a file


@dataclass
class TrainConfig:
    epochs: int = 240
    batch_size: int = 64
    test_batch_size: int = 100
    lr: float = 0.05
    lr_rule: str = "none"                # none | linear: lr *= global_batch / base_batch (DDP)
    base_batch: int = 64
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    schedule: str = "multistep"          # multistep | cosine
    warmup_epochs: int = 0
    seed: int = 0
    precision: str = "fp32"              # fp32 | bf16 | fp16 | auto
    channels_last: bool = False
    compile: str = "none"                # none | kd_layers: torch.compile the letKD layers + template losses
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    deterministic: bool = False
    grad_clip: float = 0.0
    eval_every: int = 1
    sync_bn: bool = False
    progress: bool = True
    threads: int = 0                     # torch CPU threads (0: torch default)


@dataclass
class RunConfig:
    dir: str = ""                        # empty: runs/<data>/<method>/<teacher>-<model>/seed<seed>
    overwrite: bool = False
    tensorboard: bool = True
    checkpoint_every: int = 1            # epochs between last.pt writes


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "vanilla"})
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "vanilla"))


_RANGES: dict[str, tuple[float | None, float | None]] = {
    "train.epochs": (1, None), "train.batch_size": (1, None), "train.test_batch_size": (1, None),
    "train.lr": (0, None), "train.momentum": (0, 1), "train.weight_decay": (0, None),
    "train.gamma": (0, 1), "train.warmup_epochs": (0, None), "train.grad_clip": (0, None),
    "train.eval_every": (1, None), "train.base_batch": (1, None), "train.threads": (0, None),
    "data.train_subset": (0, None), "data.test_subset": (0, None), "data.num_workers": (0, None),
    "data.image_size": (0, None), "run.checkpoint_every": (1, None),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("fashion_mnist", "cifar100", "tiny_imagenet", "imagenet", "image_folder"),
    "data.augment": ("auto", "none", "crop", "crop_flip", "rotate_flip", "imagenet"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "train.schedule": ("multistep", "cosine"),
    "train.lr_rule": ("none", "linear"),
    "train.compile": ("none", "kd_layers"),
}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__}); write e.g. {key}=[1,2,3]")
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 / 5e30 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    return value


def build_dataclass(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``values``, checking keys, types and ranges."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if prefix == "method":
        values.pop("name", None)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + u for u in unknown)}; "
            f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        v = _check_type(value, hints[name], key)
        lo, hi = _RANGES.get(key, (None, None))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if lo is not None and v < lo or hi is not None and v > hi:
                rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise ConfigError(f"{key}={v!r} is out of range {rng}")
        if key in _CHOICES and v not in _CHOICES[key]:
            raise ConfigError(f"{key}={v!r} is not valid; choose one of {', '.join(_CHOICES[key])}")
        kwargs[name] = v
    return cls(**kwargs)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "teacher": TeacherConfig,
             "train": TrainConfig, "run": RunConfig}


def from_dict(d: dict[str, Any]) -> Config:
    """Validate a plain dict (e.g. a parsed YAML) into a :class:`Config`."""
    d = dict(d or {})
    d.pop("inherit", None)
    unknown = sorted(set(d) - set(_SECTIONS) - {"method"})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: "
                          f"{sorted([*_SECTIONS, 'method'])}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sec = d.get(name) or {}
        if not isinstance(sec, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys, got {sec!r}")
        kwargs[name] = build_dataclass(cls, sec, prefix=name)
    method = d.get("method") or {"name": "vanilla"}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict):
        raise ConfigError(f"section 'method' must be a mapping with at least 'name', got {method!r}")
    method = dict(method)
    method.setdefault("name", "vanilla")
    from letkd import methods as _m

    if method["name"] not in _m.names():
        raise ConfigError(f"method.name={method['name']!r} is not a known method; valid: {', '.join(_m.names())}")
    # validate the method's parameters against its dataclass, keep the fully-resolved values
    params = _m.make_params(method["name"], method)
    kwargs["method"] = {"name": method["name"], **dataclasses.asdict(params)}
    cfg = Config(**kwargs)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    t = cfg.train
    if cfg.train.schedule == "multistep" and any(m < 1 for m in t.milestones):
        raise ConfigError(f"train.milestones must be epochs >= 1, got {t.milestones}")
    if cfg.data.name == "image_folder" and not cfg.data.train_dir:
        raise ConfigError("data.name=image_folder needs data.train_dir (a folder with one sub-folder per class) "
                          "and data.test_dir")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-data form of a config (what ``config.yaml`` of a run holds)."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain data is allowed): {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(d).__name__}")
    parents = d.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for p in parents:
        merged = _merge(merged, _read_yaml(path.parent / p, (*seen, path)))
    return _merge(merged, d)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "method.alpha_inter=0.5"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. train.epochs)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def load(path: str | Path | None, overrides: list[str] | None = None, base: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (with its ``inherit`` chain), apply overrides, validate."""
    d = _merge(base or {}, _read_yaml(Path(path)) if path else {})
    over = parse_overrides(overrides or [])
    new_method = (over.get("method") or {}).get("name") if isinstance(over.get("method"), dict) else None
    if new_method is not None and isinstance(d.get("method"), dict) and d["method"].get("name") != new_method:
        # switching method from the command line: the file's method parameters belong to
        # another method, so they are dropped (the new method starts from its defaults)
        d["method"] = {}
    d = _merge(d, over)
    return from_dict(d)
