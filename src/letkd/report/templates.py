"""Template maps: which template of each KD layer wins at each location ("the student decides").

For a checkpoint whose deployable student carries KD layers (letkd1 / letkd2 / quest), the first
``n`` test images go through the student; each :class:`letkd.layers.KDLayer` keeps its template
scores ``a`` (B×K×H×W, ``layer.last_scores``). At every location the winning template is
``argmax_k a_{k|i}`` (:func:`argmax_map`); the map is upsampled (nearest) to the image and drawn
over the de-normalised image, semi-transparent.

* Intermediate layer (``kd_layers.inter``, ``K = k_sub · num_classes``): template ``j`` is
  sub-class ``(c, k)`` with ``j = c·k_sub + k`` — the flat index of
  :mod:`letkd.targets.decisions` (rows/columns of the score matrix ``S`` that supervises the
  layer's scores) — so its class is ``c = j // k_sub`` (:func:`template_classes`). The map is
  coloured by that class, with a legend of class names; each cell shows the sub-class index ``k``.
* Penultimate layer (``kd_layers.penult``, ``K = k_penult`` codebook templates): coloured by
  template, each cell shows the template index.

Titles: predicted vs true class; for the intermediate layer also the majority class of the map.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["template_classes", "argmax_map", "upsample_nearest", "majority", "kd_layers_of",
           "capture_scores", "first_test_images", "denormalise", "draw_template_maps", "template_maps"]


def template_classes(index: torch.Tensor | np.ndarray | int, k_sub: int):
    """Class of intermediate template ``j``: ``j // k_sub`` (sub-class ``(c, k)`` ↔ ``j = c·k_sub + k``)."""
    if k_sub < 1:
        raise ValueError(f"k_sub must be >= 1, got {k_sub}")
    return index // k_sub


def argmax_map(scores: torch.Tensor) -> torch.Tensor:
    """B×K×H×W template scores -> B×H×W index of the winning template (first index on ties)."""
    if scores.dim() != 4:
        raise ValueError(f"argmax_map expects B×K×H×W scores, got shape {tuple(scores.shape)}")
    return scores.detach().float().argmax(1)


def upsample_nearest(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """B×h×w integer maps -> B×H×W by nearest-neighbour upsampling (indices unchanged)."""
    up = F.interpolate(maps[:, None].double(), size=tuple(size), mode="nearest")
    return up[:, 0].round().long()


def majority(values: np.ndarray) -> tuple[int, float]:
    """Most frequent value of an integer map (smallest on ties) and its share of locations."""
    v, c = np.unique(np.asarray(values).ravel(), return_counts=True)
    i = int(np.argmax(c))
    return int(v[i]), float(c[i]) / float(c.sum())


def kd_layers_of(model: torch.nn.Module) -> dict[str, Any]:
    """``{role: KDLayer}`` of a model, role = the module's last name ('inter', 'penult'), in
    forward-attachment order (inter before penult)."""
    from letkd.layers import KDLayer

    found = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, KDLayer)}
    order = {"inter": 0, "penult": 1}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


@torch.no_grad()
def capture_scores(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the (eval-mode) student on ``images``; return (logits, {role: B×K×H×W scores})."""
    layers = kd_layers_of(model)
    for layer in layers.values():
        layer.last_scores = None
    was = model.training
    model.eval()
    logits = model(images)
    model.train(was)
    scores = {}
    for role, layer in layers.items():
        if layer.last_scores is None:
            raise RuntimeError(f"KD layer {role!r} did not run in the student's forward")
        scores[role] = layer.last_scores.detach().float().cpu()
    return logits.float().cpu(), scores


def first_test_images(data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (normalised) and labels of the un-augmented test set, in order."""
    ims, labs, got = [], [], 0
    for batch in data.test_batches():
        ims.append(batch["images"][: n - got].cpu())
        labs.append(batch["labels"][: n - got].cpu())
        got += ims[-1].shape[0]
        if got >= n:
            break
    if not ims:
        raise ValueError("the test set is empty")
    return torch.cat(ims).float(), torch.cat(labs).long()


def denormalise(images: torch.Tensor, mean, std) -> np.ndarray:
    """B×C×H×W normalised -> B×H×W×C (C = 1 or 3) in [0, 1]."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float() * s + m).clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()


def _name(names: list[str], c: int) -> str:
    return names[c] if 0 <= c < len(names) else str(c)


def _class_cmap(num_classes: int) -> ListedColormap:
    base = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    if num_classes <= base.N:
        return ListedColormap([base(i) for i in range(num_classes)])
    return ListedColormap(plt.get_cmap("hsv")(np.linspace(0, 1, num_classes, endpoint=False)))


def draw_template_maps(images: np.ndarray, maps: np.ndarray, role: str, labels: np.ndarray, preds: np.ndarray,
                       class_names: list[str], path: Path, k_sub: int | None = None, num_classes: int | None = None,
                       alpha: float = 0.45, title: str = "") -> dict[str, Any]:
    """Draw winning-template maps (B×h×w template indices) over images (B×H×W×C in [0, 1]).

    With ``k_sub`` (intermediate layer) the overlay is the class map ``maps // k_sub`` coloured
    by class (legend of class names) and each cell shows the sub-class index ``j % k_sub``;
    without it (penultimate layer) the overlay is coloured by template and each cell shows the
    template index. Returns per-image details (also used for the JSON sidecar).
    """
    b, h, w = maps.shape
    H, W = images.shape[1:3]
    up = upsample_nearest(torch.from_numpy(maps), (H, W)).numpy()
    cols = min(b, 4)
    rows = (b + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.5 * rows + (1.0 if k_sub else 0.3)),
                             squeeze=False, layout="constrained")
    fs = max(3.0, min(7.0, 56.0 / max(h, w)))
    details = []
    if k_sub:
        nc = int(num_classes or (int(maps.max()) // k_sub + 1))
        cmap = _class_cmap(nc)
        overlay_all = template_classes(up, k_sub)
        vmin, vmax = -0.5, nc - 0.5
    else:
        used = np.unique(maps)
        rank = {int(t): i for i, t in enumerate(used)}
        cmap = _class_cmap(max(len(used), 1))
        overlay_all = np.vectorize(rank.__getitem__)(up) if up.size else up
        vmin, vmax = -0.5, max(len(used), 1) - 0.5
    classes_seen: set[int] = set()
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= b:
            ax.axis("off")
            continue
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.imshow(overlay_all[i], cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, interpolation="nearest")
        cy, cx = H / h, W / w
        for r in range(h):
            for c in range(w):
                j = int(maps[i, r, c])
                ax.text((c + 0.5) * cx - 0.5, (r + 0.5) * cy - 0.5, str(j % k_sub if k_sub else j), ha="center",
                        va="center", fontsize=fs, color="black",
                        path_effects=[patheffects.withStroke(linewidth=1.5, foreground="white", alpha=0.7)])
        t_ok = "✓" if preds[i] == labels[i] else "✗"
        head = f"pred {_name(class_names, int(preds[i]))} / true {_name(class_names, int(labels[i]))} {t_ok}"
        d: dict[str, Any] = {"index": i, "true": int(labels[i]), "pred": int(preds[i]),
                             "true_name": _name(class_names, int(labels[i])),
                             "pred_name": _name(class_names, int(preds[i])), "templates": maps[i].tolist()}
        if k_sub:
            cmap_i = template_classes(maps[i], k_sub)
            maj, share = majority(cmap_i)
            classes_seen.update(int(v) for v in np.unique(cmap_i))
            head += f"\nmajority: {_name(class_names, maj)} ({100 * share:.0f}% of {h}×{w})"
            d.update(classes=cmap_i.tolist(), majority_class=maj, majority_name=_name(class_names, maj),
                     majority_share=share)
        else:
            n_used = len(np.unique(maps[i]))
            head += f"\n{n_used} distinct templates on {h}×{w}"
            d["distinct_templates"] = n_used
        ax.set_title(head, fontsize=8)
        details.append(d)
    if k_sub:
        handles = [Patch(color=cmap(c), label=_name(class_names, c)) for c in sorted(classes_seen)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8,
                   frameon=False, title=f"class of the winning template (j // {k_sub}); numbers: sub-class j % {k_sub}",
                   title_fontsize=8)
    fig.suptitle(title or f"KD layer '{role}': winning template per location", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return {"role": role, "map_size": [h, w], "k_sub": k_sub, "images": details}


def _checkpoint(run_dir: Path, which: str = "best") -> Path | None:
    order = ("best.pt", "last.pt") if which == "best" else ("last.pt", "best.pt")
    for name in order:
        p = run_dir / "checkpoints" / name
        if p.is_file():
            return p
    return None


def template_maps(run_dir: Path, out: Path, n_images: int = 8, overrides: list[str] | None = None,
                  checkpoint: str = "best", prefix: str = "", log=print) -> list[Path]:
    """Template-map PNGs (+ a JSON of the maps) of a run's checkpoint; [] (with a message) when
    the run has no checkpoint, no KD layers or no test data."""
    run_dir = Path(run_dir)
    ck_path = _checkpoint(run_dir, checkpoint)
    if ck_path is None:
        log(f"{run_dir}: no checkpoint in checkpoints/ — no template maps")
        return []
    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import rebuild_deployable

    ck = load_file(ck_path)
    if overrides:
        from letkd import config

        ck["config"] = config.to_dict(config.load(None, list(overrides), base=ck["config"]))
    model, cfg, info = rebuild_deployable(ck, "cpu")
    layers = kd_layers_of(model)
    if not layers:
        log(f"{run_dir}: method {cfg.method_name!r} has no KD layers — no template maps")
        return []
    from letkd import data as datamod

    try:
        data = datamod.build(cfg.data, batch_size=cfg.train.batch_size,
                             test_batch_size=max(1, min(cfg.train.test_batch_size, n_images)), device="cpu",
                             seed=cfg.train.seed)
    except (FileNotFoundError, OSError, ValueError) as e:
        log(f"{run_dir}: cannot load the test set of {cfg.data.name!r} ({e}) — no template maps "
            f"(pass data.root=... to point at the data)")
        return []
    images, labels = first_test_images(data, n_images)
    logits, scores = capture_scores(model, images)
    preds = logits.argmax(1).numpy()
    names = list(getattr(data.info, "class_names", []) or [])
    pix = denormalise(images, data.info.mean, data.info.std)
    num_classes = int(info.get("num_classes", data.info.num_classes))
    k_sub_cfg = cfg.method.get("k_sub")
    written, sidecar = [], {"checkpoint": str(ck_path), "epoch": ck.get("epoch"), "method": cfg.method_name,
                            "class_names": names, "layers": {}}
    for role, sc in scores.items():
        maps = argmax_map(sc).numpy()
        k_sub = None
        if role == "inter":
            k_sub = int(k_sub_cfg) if k_sub_cfg else sc.shape[1] // num_classes
            if k_sub * num_classes != sc.shape[1]:
                log(f"{run_dir}: intermediate layer has K={sc.shape[1]} templates, not k_sub·num_classes="
                    f"{k_sub}·{num_classes}; drawing template indices instead of classes")
                k_sub = None
        what = (f"class of the winning sub-class template (K={sc.shape[1]} = {k_sub}·{num_classes})" if k_sub
                else f"winning template index (K={sc.shape[1]})")
        title = f"{cfg.method_name} {cfg.model.name}, KD layer '{role}' ({maps.shape[1]}×{maps.shape[2]}): {what}"
        path = out / f"{prefix}template_maps_{role}.png"
        sidecar["layers"][role] = draw_template_maps(pix, maps, role, labels.numpy(), preds, names, path,
                                                     k_sub=k_sub, num_classes=num_classes, title=title)
        sidecar["layers"][role]["num_templates"] = int(sc.shape[1])
        written.append(path)
    js = out / f"{prefix}template_maps.json"
    js.write_text(json.dumps(sidecar, indent=1))
    written.append(js)
    return written
