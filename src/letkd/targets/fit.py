"""Offline fit of all teacher targets (METHOD §3): the passes over the un-augmented training set.

Passes (each streams the whole training set through the frozen teacher, one batch at a time):

* **pass 1** — penultimate rows into the codebook sample (all rows, or a uniform sample of
  ``max_samples``); intermediate rows into the exact LDA class statistics (all rows, always).
  Then K-means codebook (Alg. 1) and LDA (Alg. 2 step 1).
* **pass 2** — LDA-projected intermediate rows (d ≤ 60 columns) kept per class (all, or a
  uniform sample of ``ceil(max_samples / num_classes)`` per class, at least ``k_sub``);
  then per-class K-means (Alg. 2 step 2).
* **pass 3** — h1 of every location and the prototype sums (step 3).
* **pass 4** — h2 of every location and the ``h1 -> h2`` counts, i.e. ``S`` (steps 4-5).

Without a cap pass 2 holds every location's LDA features, so passes 3 and 4 run over that
in-memory copy (same result, no further teacher passes). Every location is counted in the
LDA statistics, the prototypes and ``S``; only the K-means fits may be given a sample.
"""
from __future__ import annotations

import math
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import torch
from torch import nn

from letkd.targets.codebook import fit_codebook
from letkd.targets.decisions import ClassStats, DecisionStats, fit_lda, fit_subclass_centres, lda_project
from letkd.targets.extract import RowSampler, stream_features

__all__ = ["fit_targets", "lda_dimension"]


def lda_dimension(lda_dim: int, channels: int, num_classes: int) -> int:
    """``d = min(lda_dim, C_t, num_classes − 1)`` (METHOD §3b step 1)."""
    d = min(int(lda_dim), int(channels), int(num_classes) - 1)
    if d < 1:
        raise ValueError(f"LDA needs d >= 1: lda_dim={lda_dim}, channels={channels}, num_classes={num_classes}")
    return d


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[letkd fit-targets] {msg}", file=sys.stderr, flush=True)


def fit_targets(teacher: nn.Module, teacher_arch: str | None, batches_fn: Callable[[], Iterable[Any]], *,
                penult_path: str | None, inter_path: str | None,
                penult_pool: tuple[int, int] | None, inter_pool: tuple[int, int] | None,
                num_classes: int, k_penult: int = 4096, k_sub: int = 8, lda_dim: int = 60,
                kmeans_iters: int = 20, max_samples: int | None = None, seed: int = 0,
                progress: bool = True, teacher_fingerprint: str | None = None,
                meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the penultimate codebook (Alg. 1) and/or the intermediate decisions (Alg. 2).

    ``batches_fn()`` returns a fresh iterable over the un-augmented training batches (dicts with
    ``images``, ``labels``; it is called once per pass). ``penult_path`` / ``inter_path`` are
    teacher module paths (None: skip that part); ``*_pool`` the student's H×W at that layer
    (None: keep the teacher's size). ``max_samples`` caps the K-means inputs (None or 0: all).
    Returns the artifact dict of :mod:`letkd.targets.artifact` (``meta`` entries are added to
    its metadata, e.g. dataset name and size).
    """
    if penult_path is None and inter_path is None:
        raise ValueError("fit_targets: nothing to fit (penult_path and inter_path are both None)")
    from letkd import __version__
    from letkd.targets.artifact import teacher_fingerprint as _fp

    cap = int(max_samples) if max_samples else None
    paths = {n: p for n, p in (("penult", penult_path), ("inter", inter_path)) if p is not None}
    pools = {"penult": penult_pool, "inter": inter_pool}
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    device = next(iter(teacher.parameters())).device

    # ---- pass 1: codebook sample + LDA statistics ----------------------------------------
    t0 = time.perf_counter()
    sampler = RowSampler(cap, seed) if penult_path else None
    stats: ClassStats | None = None
    for fb in stream_features(teacher, batches_fn(), paths, pools):
        if sampler is not None:
            sampler.add(fb.feats["penult"])
        if inter_path is not None:
            x = fb.feats["inter"]
            if stats is None:
                stats = ClassStats(num_classes, x.shape[1], device)
            stats.update(x, fb.labels["inter"])
    timings["pass1_features"] = time.perf_counter() - t0
    _log(progress, f"pass 1: {timings['pass1_features']:.1f}s")

    out: dict[str, Any] = {"penult": None, "inter": None}
    if sampler is not None:
        t0 = time.perf_counter()
        rows, _ = sampler.result()
        counts["penult_locations"] = sampler.seen
        counts["penult_kmeans_rows"] = int(rows.shape[0])
        centroids = fit_codebook(rows, k_penult, kmeans_iters, seed)
        del rows
        out["penult"] = {"centroids": centroids}
        timings["codebook_kmeans"] = time.perf_counter() - t0
        _log(progress, f"codebook: K={k_penult} on {counts['penult_kmeans_rows']}/{sampler.seen} locations "
                       f"in {timings['codebook_kmeans']:.1f}s")

    lda_d = None
    if inter_path is not None:
        if stats is None:
            raise ValueError("fit_targets: the training batches were empty")
        t0 = time.perf_counter()
        lda_d = lda_dimension(lda_dim, stats.dim, num_classes)
        mean, W, evals = fit_lda(stats, lda_d)
        counts["inter_locations"] = stats.total
        timings["lda"] = time.perf_counter() - t0

        # ---- pass 2: LDA features per class, per-class K-means -------------------------
        t0 = time.perf_counter()
        per_cap = max(k_sub, math.ceil(cap / num_classes)) if cap else None
        samplers: dict[int, RowSampler] = {}
        all_rows = RowSampler(None) if per_cap is None else None
        mean_d, W_d = mean.to(device), W.to(device)
        for fb in stream_features(teacher, batches_fn(), {"inter": paths["inter"]}, {"inter": inter_pool}):
            z, y = lda_project(fb.feats["inter"], mean_d, W_d), fb.labels["inter"]
            if all_rows is not None:
                all_rows.add(z, y)
                continue
            for c in torch.unique(y).tolist():
                if c not in samplers:
                    samplers[c] = RowSampler(per_cap, seed + 1 + c)
                samplers[c].add(z[y == c])
        if all_rows is not None:
            z_all, y_all = all_rows.result()
        else:
            parts = [(s.result()[0], c) for c, s in sorted(samplers.items())]
            z_all = torch.cat([p for p, _ in parts])
            y_all = torch.cat([torch.full((len(p),), c, dtype=torch.long) for p, c in parts])
        counts["inter_kmeans_rows"] = int(z_all.shape[0])
        timings["pass2_lda_features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        centres, _filler = fit_subclass_centres(z_all, y_all, num_classes, k_sub, kmeans_iters, seed)
        timings["subclass_kmeans"] = time.perf_counter() - t0
        _log(progress, f"sub-classes: {num_classes}×{k_sub} centres on {counts['inter_kmeans_rows']}/"
                       f"{stats.total} locations, d={lda_d}")

        # ---- passes 3-4: prototypes, decisions, score matrix ---------------------------
        dec = DecisionStats(centres)
        t0 = time.perf_counter()
        if all_rows is not None:   # every location is in memory: no further teacher passes
            dec.add_prototypes(z_all, y_all)
            dec.finish_prototypes()
            timings["pass3_prototypes"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            dec.add_decisions(z_all, y_all)
        else:
            del z_all, y_all
            for fb in stream_features(teacher, batches_fn(), {"inter": paths["inter"]}, {"inter": inter_pool}):
                dec.add_prototypes(lda_project(fb.feats["inter"], mean_d, W_d), fb.labels["inter"])
            dec.finish_prototypes()
            timings["pass3_prototypes"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for fb in stream_features(teacher, batches_fn(), {"inter": paths["inter"]}, {"inter": inter_pool}):
                dec.add_decisions(lda_project(fb.feats["inter"], mean_d, W_d), fb.labels["inter"])
        timings["pass4_decisions"] = time.perf_counter() - t0
        n_counted = int(dec.counts.sum())
        if n_counted != stats.total:
            raise RuntimeError(f"fit_targets: {n_counted} locations counted in S but {stats.total} in the LDA "
                               "statistics; the training batches must be identical on every pass")
        out["inter"] = {"mean": mean, "W": W, "eigenvalues": evals, "centres": centres,
                        "prototypes": dec.prototypes, "empty": dec.empty, "counts": dec.counts,
                        "S": dec.score_matrix()}
        _log(progress, f"decisions: {int(dec.empty.sum())} empty sub-classes; "
                       f"{timings['pass3_prototypes'] + timings['pass4_decisions']:.1f}s")

    out["meta"] = {
        "teacher_arch": teacher_arch,
        "teacher_fingerprint": teacher_fingerprint if teacher_fingerprint is not None else _fp(teacher),
        "penult_path": penult_path, "inter_path": inter_path,
        "penult_pool": list(penult_pool) if penult_pool is not None else None,
        "inter_pool": list(inter_pool) if inter_pool is not None else None,
        "num_classes": int(num_classes),
        "k_penult": int(k_penult) if penult_path else None,
        "k_sub": int(k_sub) if inter_path else None,
        "lda_dim": lda_d, "kmeans_iters": int(kmeans_iters), "max_samples": cap or 0, "seed": int(seed),
        "library_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(meta or {}),
    }
    out["timings"] = timings
    out["num_samples"] = counts
    return out
