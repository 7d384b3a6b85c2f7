"""Offline fit of all teacher targets (METHOD §3): two passes of the frozen teacher over the
un-augmented training set, one batch at a time.

* **pass 1** — penultimate rows into the codebook sample (all rows, or a uniform sample of
  ``max_samples``); intermediate rows into the exact LDA class statistics (all rows, always).
  Then K-means codebook (Alg. 1) and LDA (Alg. 2 step 1).
* **pass 2** — every intermediate row projected by the LDA (d ≤ 60 columns). The rows are kept
  per class for the per-class K-means (all, or a uniform sample of
  ``max(k_sub, ceil(max_samples / num_classes))`` per class), and every row's projection is kept
  for the steps after it: in memory when uncapped (the K-means holds every row then anyway),
  in a temporary file when capped (:class:`letkd.targets.spill.FeatureSpill`: resident memory
  stays bounded in the dataset size, the disk holds ``N·H·W·(4d + 4)`` bytes). Then the
  per-class K-means (Alg. 2 step 2).
* **steps 3-5, no teacher** — h1 of every location and the prototype sums (step 3), then h2 of
  every location and the ``h1 -> h2`` counts, i.e. ``S`` (steps 4-5), each read back from what
  pass 2 kept, in the batches the teacher produced.

Every location is counted in the LDA statistics, the prototypes and ``S``; only the K-means fits
may be given a sample. Up to this rewrite the capped fit ran the teacher again for steps 3 and 4
(4 passes); the same batches now come from the file, so every floating-point operation and its
order are unchanged and the targets are bit-identical (tests/test_targets.py checks them against
the four-pass order). ``num_samples["teacher_passes"]`` records how many passes were made.

**Distributed** (``distributed=True``, under torchrun; ``batches_fn`` yields this rank's shard,
as ``Data.plain_train_batches`` does): every pass streams only the rank's shard, and each rank
keeps its own shard's LDA features. The exact statistics are all-reduced (LDA class counts /
sums / second moments, prototype sums and counts, the ``h1 -> h2`` counts of ``S``). The K-means
fits run on rank 0 alone: each rank keeps its part of the sample (a row is kept by a key that is
a fixed function of its global position, :func:`letkd.targets.extract.sample_keys`), rank 0
gathers the parts (all rows when uncapped), selects exactly the rows one process would select,
fits, and broadcasts the centres; the other ranks wait (gloo group with a long timeout,
``LETKD_DIST_TIMEOUT_MIN``). Hence the result equals the single-process fit up to floating-point
summation order. Rank 0 gathers only the K-means sample (``max_samples`` rows, or every row when
uncapped, as one process would hold).
"""
from __future__ import annotations

import math
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import torch
from torch import nn

from letkd.engine import dist
from letkd.targets.codebook import fit_codebook
from letkd.targets.decisions import ClassStats, DecisionStats, fit_lda, fit_subclass_centres, lda_project
from letkd.targets.extract import RowSampler, row_positions, select_rows, stream_features
from letkd.targets.spill import FeatureSpill

__all__ = ["fit_targets", "lda_dimension"]

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]   # a sampler's (rows, extra, pos, keys)
Replay = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]             # -> every kept (z, y) batch, in order


def lda_dimension(lda_dim: int, channels: int, num_classes: int) -> int:
    """``d = min(lda_dim, C_t, num_classes − 1)`` (METHOD §3b step 1)."""
    d = min(int(lda_dim), int(channels), int(num_classes) - 1)
    if d < 1:
        raise ValueError(f"LDA needs d >= 1: lda_dim={lda_dim}, channels={channels}, num_classes={num_classes}")
    return d


def _log(progress: bool, msg: str) -> None:
    if progress and dist.is_main():
        print(f"[letkd fit-targets] {msg}", file=sys.stderr, flush=True)


def _width(local: int, distributed: bool) -> int:
    """The row width, agreed over ranks (a rank may have seen no rows)."""
    if not distributed:
        return local
    return int(dist.all_reduce_max(torch.tensor([local], dtype=torch.long))[0])


def _merged(parts: list[Parts], cap: int | None, distributed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sample of rows (grouped by ``extra``, ``cap`` per group, position order within a group,
    groups in increasing order) from every rank's sampler parts. None on ranks other than 0."""
    rows = torch.cat([p[0] for p in parts])
    extra = torch.cat([p[1] for p in parts])
    pos = torch.cat([p[2] for p in parts])
    keys = torch.cat([p[3] for p in parts]) if cap is not None else None
    if distributed:
        got = dist.gather_cat([rows, extra, pos] + ([keys] if keys is not None else []))
        if got is None:
            return None
        rows, extra, pos = got[:3]
        keys = got[3] if keys is not None else None
    out_r, out_e = [], []
    for c in torch.unique(extra).tolist():
        m = extra == c
        r, e = select_rows(rows[m], extra[m], pos[m], keys[m] if keys is not None else None, cap)
        out_r.append(r)
        out_e.append(e)
    if not out_r:
        return rows[:0], extra[:0]
    return torch.cat(out_r), torch.cat(out_e)


def _counted(batches_fn: Callable[[], Iterable[Any]], passes: list[int]) -> Callable[[], Iterable[Any]]:
    """``batches_fn`` that counts each start of a teacher pass in ``passes[0]``."""
    def start() -> Iterable[Any]:
        passes[0] += 1
        return batches_fn()
    return start


def pass1_sample_and_class_stats(teacher: nn.Module, batches: Iterable[Any], paths: dict[str, str],
                                 pools: dict[str, tuple[int, int] | None], num_classes: int, cap: int | None,
                                 seed: int, distributed: bool) -> tuple[RowSampler | None, int, ClassStats | None]:
    """Pass 1: the codebook sample of penultimate rows (Alg. 1 input) and the exact LDA class
    statistics of the intermediate rows (Alg. 2 step 1), all-reduced over ranks.
    Returns (sampler or None, penultimate row width, class statistics or None)."""
    device = next(iter(teacher.parameters())).device
    sampler = RowSampler(cap, seed) if "penult" in paths else None
    stats: ClassStats | None = None
    width = 0
    for fb in stream_features(teacher, batches, paths, pools):
        if sampler is not None:
            width = fb.feats["penult"].shape[1]
            sampler.add(fb.feats["penult"], positions=row_positions(fb.index["penult"]))
        if "inter" in paths:
            x = fb.feats["inter"]
            if stats is None:
                stats = ClassStats(num_classes, x.shape[1], device)
            stats.update(x, fb.labels["inter"])
    if "inter" in paths and distributed:
        dim = _width(stats.dim if stats is not None else 0, True)
        if stats is None and dim > 0:   # a rank with an empty shard still takes part
            stats = ClassStats(num_classes, dim, device)
        if stats is not None:
            stats.all_reduce()
    return sampler, width, stats


def codebook_step(sampler: RowSampler, width: int, cap: int | None, k_penult: int, kmeans_iters: int, seed: int,
                  distributed: bool) -> tuple[torch.Tensor, int, int]:
    """Alg. 1 offline: K-means codebook on the (gathered) sample, on rank 0.
    Returns (centroids K×C, locations seen, rows given to K-means)."""
    sample = _merged([sampler.parts(_width(width, distributed))], cap, distributed)
    seen = torch.tensor([sampler.seen], dtype=torch.long)
    locations = int(dist.all_reduce_sum(seen)[0]) if distributed else sampler.seen

    def _codebook() -> tuple[torch.Tensor, int]:
        rows = sample[0]
        return fit_codebook(rows, k_penult, kmeans_iters, seed), int(rows.shape[0])

    centroids, rows = dist.on_main(_codebook) if distributed else _codebook()
    return centroids, locations, rows


def pass2_lda_features(teacher: nn.Module, batches: Iterable[Any], path: str, pool: tuple[int, int] | None,
                       mean: torch.Tensor, W: torch.Tensor, per_cap: int | None, seed: int,
                       spill_dir: str | None) -> tuple[list[Parts], Replay, FeatureSpill | None]:
    """Pass 2: project every intermediate row by the LDA (step 1 online); keep the per-class
    K-means sample (step 2's input) and every row's projection for steps 3-5.

    Returns (this rank's sample parts, a function that replays every row's ``(z, y)`` in the
    batches of this pass, the spill file to close or None). Uncapped: every row is in memory
    (one chunk, position order); capped: the rows go to a :class:`FeatureSpill` on disk.
    """
    device = next(iter(teacher.parameters())).device
    d = W.shape[1]
    samplers: dict[int, RowSampler] = {}
    all_rows = RowSampler(None) if per_cap is None else None
    spill = FeatureSpill(d, spill_dir) if per_cap is not None else None
    mean_d, W_d = mean.to(device), W.to(device)
    try:
        for fb in stream_features(teacher, batches, {"inter": path}, {"inter": pool}):
            z, y = lda_project(fb.feats["inter"], mean_d, W_d), fb.labels["inter"]
            pos = row_positions(fb.index["inter"])
            if all_rows is not None:
                all_rows.add(z, y, positions=pos)
                continue
            spill.write(z, y)
            for c in torch.unique(y).tolist():
                if c not in samplers:
                    samplers[c] = RowSampler(per_cap, seed + 1 + c)
                m = (y == c).cpu()
                samplers[c].add(z[y == c], y[y == c], positions=pos[m])
    except BaseException:
        if spill is not None:
            spill.close()
        raise
    if all_rows is not None:
        z_loc, y_loc = all_rows.result()   # this rank's rows, position order
        return [all_rows.parts(d)], (lambda: [(z_loc, y_loc)]), None
    parts = [s.parts(d) for _, s in sorted(samplers.items())] or [RowSampler(per_cap).parts(d)]
    return parts, (lambda: spill.replay(device)), spill


def subclass_step(parts: list[Parts], per_cap: int | None, num_classes: int, k_sub: int, kmeans_iters: int,
                  seed: int, distributed: bool) -> tuple[torch.Tensor, int]:
    """Alg. 2 step 2: per-class K-means on the (gathered) sample of LDA features, on rank 0.
    Returns (centres nc×K_sub×d, rows given to K-means)."""
    sample = _merged(parts, per_cap, distributed)

    def _subclasses() -> tuple[torch.Tensor, int]:
        z_all, y_all = sample
        return fit_subclass_centres(z_all, y_all, num_classes, k_sub, kmeans_iters, seed)[0], int(z_all.shape[0])

    return dist.on_main(_subclasses) if distributed else _subclasses()


def prototype_step(dec: DecisionStats, replay: Replay, distributed: bool) -> None:
    """Alg. 2 step 3: h1 of every kept location, prototype sums (all-reduced), prototypes."""
    for z, y in replay():
        dec.add_prototypes(z, y)
    if distributed:
        dec.all_reduce_prototypes()
    dec.finish_prototypes()


def decision_step(dec: DecisionStats, replay: Replay, distributed: bool) -> None:
    """Alg. 2 steps 4-5: h2 of every kept location and the ``h1 -> h2`` counts (all-reduced)."""
    for z, y in replay():
        dec.add_decisions(z, y)
    if distributed:
        dec.all_reduce_decisions()


def fit_targets(teacher: nn.Module, teacher_arch: str | None, batches_fn: Callable[[], Iterable[Any]], *,
                penult_path: str | None, inter_path: str | None,
                penult_pool: tuple[int, int] | None, inter_pool: tuple[int, int] | None,
                num_classes: int, k_penult: int = 4096, k_sub: int = 8, lda_dim: int = 60,
                kmeans_iters: int = 20, max_samples: int | None = None, seed: int = 0,
                progress: bool = True, teacher_fingerprint: str | None = None,
                meta: dict[str, Any] | None = None, distributed: bool = False,
                spill_dir: str | None = None) -> dict[str, Any]:
    """Fit the penultimate codebook (Alg. 1) and/or the intermediate decisions (Alg. 2).

    ``batches_fn()`` returns a fresh iterable over the un-augmented training batches (dicts with
    ``images``, ``labels``; it is called once per teacher pass, at most twice). ``penult_path`` /
    ``inter_path`` are teacher module paths (None: skip that part); ``*_pool`` the student's H×W
    at that layer (None: keep the teacher's size). ``max_samples`` caps the K-means inputs (None
    or 0: all). Returns the artifact dict of :mod:`letkd.targets.artifact` (``meta`` entries are
    added to its metadata, e.g. dataset name and size). ``distributed``: every DDP rank calls
    this with its own shard of the batches (with their ``index``) and gets the same result
    (module docstring); ignored when the process group has one rank. ``spill_dir``: folder of
    the temporary file of LDA features when capped (default: ``$TMPDIR``).
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
    distributed = bool(distributed) and dist.world_size() > 1
    passes = [0]
    batches_fn = _counted(batches_fn, passes)

    # ---- pass 1: codebook sample + LDA statistics ----------------------------------------
    t0 = time.perf_counter()
    sampler, width, stats = pass1_sample_and_class_stats(teacher, batches_fn(), paths, pools, num_classes, cap,
                                                         seed, distributed)
    timings["pass1_features"] = time.perf_counter() - t0
    _log(progress, f"pass 1: {timings['pass1_features']:.1f}s")

    out: dict[str, Any] = {"penult": None, "inter": None}
    if sampler is not None:
        t0 = time.perf_counter()
        centroids, counts["penult_locations"], counts["penult_kmeans_rows"] = codebook_step(
            sampler, width, cap, k_penult, kmeans_iters, seed, distributed)
        del sampler
        out["penult"] = {"centroids": centroids}
        timings["codebook_kmeans"] = time.perf_counter() - t0
        _log(progress, f"codebook: K={k_penult} on {counts['penult_kmeans_rows']}/{counts['penult_locations']} locations "
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

        # ---- pass 2: LDA features, per-class K-means -----------------------------------
        t0 = time.perf_counter()
        per_cap = max(k_sub, math.ceil(cap / num_classes)) if cap else None
        parts, replay, spill = pass2_lda_features(teacher, batches_fn(), paths["inter"], inter_pool, mean, W,
                                                  per_cap, seed, spill_dir)
        try:
            timings["pass2_lda_features"] = time.perf_counter() - t0
            if spill is not None:
                _log(progress, f"pass 2: {timings['pass2_lda_features']:.1f}s; {spill.rows} LDA features kept "
                               f"on disk ({spill.nbytes / 2**20:.1f} MiB)")
            t0 = time.perf_counter()
            centres, counts["inter_kmeans_rows"] = subclass_step(parts, per_cap, num_classes, k_sub, kmeans_iters,
                                                                 seed, distributed)
            del parts
            timings["subclass_kmeans"] = time.perf_counter() - t0
            _log(progress, f"sub-classes: {num_classes}×{k_sub} centres on {counts['inter_kmeans_rows']}/"
                           f"{stats.total} locations, d={lda_d}")

            # ---- steps 3-5 on the kept features: prototypes, decisions, score matrix -------
            dec = DecisionStats(centres)
            t0 = time.perf_counter()
            prototype_step(dec, replay, distributed)
            timings["prototypes"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            decision_step(dec, replay, distributed)
            timings["decisions"] = time.perf_counter() - t0
        finally:
            del replay
            if spill is not None:
                spill.close()
        n_counted = int(dec.counts.sum())
        if n_counted != stats.total:
            raise RuntimeError(f"fit_targets: {n_counted} locations counted in S but {stats.total} in the LDA "
                               "statistics; the training batches must be identical on every pass")
        out["inter"] = {"mean": mean.cpu(), "W": W.cpu(), "eigenvalues": evals.cpu(), "centres": centres,
                        "prototypes": dec.prototypes, "empty": dec.empty, "counts": dec.counts,
                        "S": dec.score_matrix()}
        _log(progress, f"decisions: {int(dec.empty.sum())} empty sub-classes; "
                       f"{timings['prototypes'] + timings['decisions']:.1f}s")
    counts["teacher_passes"] = passes[0]

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
