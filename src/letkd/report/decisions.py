"""Diagnostics of the student's decisions: does the student decide as the teacher does?

For a trained letKD / QuEST run, on the test set, per KD layer (``inter``, ``penult``):

* ``agreement``: share of locations where the student's winning template ``argmax_k a_{k|i}``
  equals the argmax of the teacher's target ``p^T_i`` (codebook softmax, METHOD §3a; row of the
  score matrix ``S`` of the teacher's sub-class decision, METHOD §3b);
* codebook usage: how many of the K templates ever win (``templates_won``) and how many are
  ever a target argmax (``templates_targeted``);
* ``target_entropy``: mean entropy of the targets (nats; ``log K`` is uniform, 0 one-hot);
* ``template_kl``: the template loss ``KL(p^T ‖ softmax(a))`` on the test set;
* intermediate layer only: ``s_diagonal_mass`` (mean ``S_jj``: how much of a decision's target
  mass stays on the decided sub-class) and ``winner_class_is_label`` (share of locations whose
  winning sub-class template belongs to the image's class);
* ``acc_alpha0``: the student's test accuracy with that layer's residual weight α set to 0 at
  test time (what the value branch carries; ``acc`` is the accuracy as trained), and
  ``acc_alpha0_all`` with every layer's α = 0.

:func:`decision_diagnostics` computes them for a built distiller; :func:`diagnose_run` does it
for a run directory (``letkd diagnose RUN_DIR``), rebuilding the teacher and its targets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from letkd.targets.codebook import soft_targets
from letkd.targets.decisions import decision_targets, lda_project
from letkd.targets.extract import pool_to_size, to_rows

__all__ = ["teacher_targets", "decision_diagnostics", "diagnose_run", "diagnostics_markdown"]


def teacher_targets(distiller: Any, role: str, size: tuple[int, int], labels: torch.Tensor) -> torch.Tensor:
    """The targets ``p^T`` ((B·H·W)×K rows) of KD layer ``role`` for the teacher features of the
    last :meth:`teacher_forward`, computed exactly as the training loss computes them."""
    t = pool_to_size(distiller.t_feats[distiller.t_names[role]], size)
    if role == "penult":
        return soft_targets(to_rows(t), distiller.centroids, distiller.params.tau)
    z = lda_project(to_rows(t), distiller.lda_mean, distiller.lda_W)
    y = labels.repeat_interleave(size[0] * size[1])
    return decision_targets(z, y, distiller.sub_centres, distiller.score_matrix)


def _accuracy(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    correct = count = 0
    for b in batches:
        correct += int((model(b["images"]).argmax(1) == b["labels"]).sum())
        count += int(b["labels"].numel())
    return 100.0 * correct / max(count, 1)


@torch.no_grad()
def decision_diagnostics(distiller: Any, batches: Iterable[dict] | Any) -> dict[str, Any]:
    """The diagnostics above for ``distiller`` (a letKD method with its targets loaded) over
    ``batches`` (a re-iterable of ``{"images", "labels"}`` dicts, or a callable returning a
    fresh iterator). Returns ``{"acc", "acc_alpha0_all", "layers": {role: {...}}}``."""
    fresh = batches if callable(batches) else (lambda: iter(batches))
    student = distiller.deployable()
    student.eval()
    layers = dict(distiller.kd)
    supervised = [r for r in layers if distiller.supervised.get(r)]
    acc = {}
    sums: dict[str, dict[str, Any]] = {}
    for r in supervised:
        k = layers[r].num_templates
        sums[r] = {"agree": 0, "n": 0, "entropy": 0.0, "kl": 0.0, "label": 0,
                   "won": torch.zeros(k, dtype=torch.long), "targeted": torch.zeros(k, dtype=torch.long)}
    correct = count = 0
    for b in fresh():
        images, labels = b["images"], b["labels"]
        if supervised:
            distiller.teacher_forward(images)
        logits = student(images)
        correct += int((logits.argmax(1) == labels).sum())
        count += int(labels.numel())
        for r in supervised:
            scores = layers[r].last_scores
            a = to_rows(scores).float()
            p = teacher_targets(distiller, r, tuple(scores.shape[-2:]), labels).float()
            won, targeted = a.argmax(1), p.argmax(1)
            s = sums[r]
            s["agree"] += int((won == targeted).sum())
            s["n"] += int(a.shape[0])
            s["entropy"] += float(-torch.special.xlogy(p, p).sum())
            s["kl"] += float((torch.special.xlogy(p, p) - p * torch.log_softmax(a, 1)).sum())
            s["won"] += torch.bincount(won.cpu(), minlength=s["won"].numel())
            s["targeted"] += torch.bincount(targeted.cpu(), minlength=s["targeted"].numel())
            if r == "inter":
                k_sub = distiller.params.k_sub
                y = labels.repeat_interleave(scores.shape[-2] * scores.shape[-1])
                s["label"] += int((won // k_sub == y).sum())
        for layer in layers.values():
            layer.last_scores = None
    acc["acc"] = 100.0 * correct / max(count, 1)
    out: dict[str, Any] = {"acc": acc["acc"], "layers": {}}
    for r, layer in layers.items():
        row: dict[str, Any] = {"num_templates": layer.num_templates, "alpha": layer.alpha}
        if r in sums:
            s = sums[r]
            n = max(s["n"], 1)
            row.update(locations=s["n"], agreement=s["agree"] / n, templates_won=int((s["won"] > 0).sum()),
                       templates_targeted=int((s["targeted"] > 0).sum()), target_entropy=s["entropy"] / n,
                       uniform_entropy=math.log(layer.num_templates), template_kl=s["kl"] / n)
            if r == "inter":
                row["s_diagonal_mass"] = float(torch.diagonal(distiller.score_matrix).mean())
                row["winner_class_is_label"] = s["label"] / n
        row["acc_alpha0"] = _with_alpha0(student, [layer], fresh)
        out["layers"][r] = row
    out["acc_alpha0_all"] = _with_alpha0(student, list(layers.values()), fresh)
    return out


def _with_alpha0(student: torch.nn.Module, layers: list[Any], fresh) -> float:
    """Test accuracy with α = 0 at test time in ``layers`` (restored afterwards)."""
    saved = [layer.alpha for layer in layers]
    try:
        for layer in layers:
            layer.alpha = 0.0
        return _accuracy(student, fresh())
    finally:
        for layer, a in zip(layers, saved):
            layer.alpha = a
            layer.last_scores = None


def diagnostics_markdown(d: dict[str, Any], title: str = "") -> str:
    """A Markdown table of :func:`decision_diagnostics`' result."""
    lines = [f"### {title}" if title else "", "",
             f"student test accuracy {d['acc']:.2f} %; with α = 0 in every KD layer at test time "
             f"{d['acc_alpha0_all']:.2f} %", "",
             "| layer | K | agreement (%) | templates won | templates targeted | target entropy (nats; uniform) "
             "| test template KL | S diagonal mass | winner's class = label (%) | acc with this α = 0 (%) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, row in d["layers"].items():
        if "agreement" not in row:
            lines.append(f"| {r} | {row['num_templates']} | – | – | – | – | – | – | – | {row['acc_alpha0']:.2f} |")
            continue
        sd = f"{row['s_diagonal_mass']:.3f}" if "s_diagonal_mass" in row else "–"
        wl = f"{100 * row['winner_class_is_label']:.1f}" if "winner_class_is_label" in row else "–"
        lines.append(f"| {r} | {row['num_templates']} | {100 * row['agreement']:.1f} | {row['templates_won']} | "
                     f"{row['templates_targeted']} | {row['target_entropy']:.3f} ({row['uniform_entropy']:.2f}) | "
                     f"{row['template_kl']:.3f} | {sd} | {wl} | {row['acc_alpha0']:.2f} |")
    return "\n".join(lines).lstrip("\n") + "\n"


def diagnose_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "best",
                 overrides: list[str] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Diagnostics of a run's checkpoint (``best`` or ``last``) on its test set. Rebuilds the
    teacher from the run's config (its weights file must still be there) and loads its targets
    (the cached artifact, refitted if missing). Writes ``decisions.json`` and ``decisions.md`` to
    ``out`` (default ``RUN_DIR/report``) and returns the result."""
    from letkd import config as cfgmod
    from letkd import data as datamod
    from letkd.engine import dist
    from letkd.engine.checkpoint import load_file
    from letkd.engine.trainer import build_distiller

    run_dir = Path(run_dir)
    ck_path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not ck_path.is_file():
        raise FileNotFoundError(f"{ck_path} does not exist; diagnose a finished run directory (checkpoints/best.pt "
                                f"or last.pt), or pass --checkpoint last")
    ck = load_file(ck_path)
    cfg = cfgmod.from_dict(ck["config"])
    if overrides:
        cfg = cfgmod.load(None, list(overrides), base=ck["config"])
    if cfg.method_name not in ("letkd1", "letkd2", "quest"):
        raise ValueError(f"{run_dir}: method {cfg.method_name!r} has no KD layers; diagnostics are for letkd1, "
                         f"letkd2 and quest runs")
    cfg.train.channels_last = False
    dev = torch.device(device)
    data = datamod.build(cfg.data, batch_size=cfg.train.batch_size, test_batch_size=cfg.train.test_batch_size,
                         device=dev, seed=cfg.train.seed)
    distiller, _, _ = build_distiller(cfg, ck["data_info"], dev, dist.DistInfo())
    distiller.deployable().load_state_dict(ck["model"])
    distiller.prepare(data)
    result = decision_diagnostics(distiller, data.test_batches)
    result.update(run=str(run_dir), checkpoint=str(ck_path), epoch=ck.get("epoch"), method=cfg.method_name,
                  student=cfg.model.name, teacher=cfg.teacher.name)
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "decisions.json").write_text(json.dumps(result, indent=1) + "\n")
    title = f"{cfg.method_name} {cfg.teacher.name} → {cfg.model.name}, {ck_path.name} (epoch {ck.get('epoch')})"
    (out / "decisions.md").write_text(diagnostics_markdown(result, title))
    return result
