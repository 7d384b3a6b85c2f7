"""Offline teacher statistics for letKD (METHOD §3): streamed features, the penultimate codebook
(Alg. 1), the intermediate decisions (Alg. 2), and their artifact file."""
from __future__ import annotations

from letkd.targets.artifact import load_targets, save_targets, teacher_fingerprint
from letkd.targets.codebook import SoftTargetRows, fit_codebook, kmeans, soft_targets
from letkd.targets.decisions import (ClassStats, DecisionStats, DecisionTargetRows, assign_subclasses, decision_targets, fit_lda,
                                     fit_subclass_centres, lda_project, nearest_prototype)
from letkd.targets.extract import FeatureBatch, RowSampler, pool_to_size, stream_features, to_rows
from letkd.targets.fit import fit_targets, lda_dimension

__all__ = ["load_targets", "save_targets", "teacher_fingerprint", "fit_codebook", "kmeans", "soft_targets", "SoftTargetRows",
           "ClassStats", "DecisionStats", "DecisionTargetRows", "assign_subclasses", "decision_targets", "fit_lda",
           "fit_subclass_centres", "lda_project", "nearest_prototype", "FeatureBatch", "RowSampler",
           "pool_to_size", "stream_features", "to_rows", "fit_targets", "lda_dimension"]
