"""Time, peak memory and teacher passes of `letkd fit-targets` (offline teacher statistics, METHOD §3).

Each measurement runs the real command in a fresh process and reads that process's peak
resident memory (``ru_maxrss`` of the child). With ``--subsets N 2N`` it shows whether peak
memory grows with the dataset (it should not beyond the K-means sample cap). Each row records
``teacher_passes`` (how many times the training set went through the teacher; at most 2), the
fit's settings (``k_penult``, ``max_samples``, ``lda_dim``, ``k_sub``) and, when capped, the bytes
of LDA features the fit kept in its temporary file (``spill_bytes``: on disk, not in memory).

    python benchmarks/fit_targets.py --config configs/fashion_mnist/resnet20_resnet8/letkd2.yaml \
        --subsets 0 --set method.k_penult=4096 --out benchmarks/results/fit_targets_fmnist.json
    python benchmarks/fit_targets.py --config configs/fashion_mnist/resnet20_resnet8/letkd2.yaml \
        --subsets 15000 30000 --set method.max_samples=100000 method.k_penult=4096 \
        --out benchmarks/results/fit_targets_scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(config: str, subset: int, extra: list[str], targets_dir: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "letkd", "fit-targets", config, f"data.train_subset={subset}",
               f"method.targets_dir={targets_dir or tmp}", "train.progress=false", *extra, "--force"]
        log = Path(tmp) / "out.txt"
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS in KiB)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        text = log.read_text()
        if proc.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{text}")
        peak_kib = usage.ru_maxrss
        out = json.loads(text[text.index("{\n"):])
        size = Path(out["targets"]).stat().st_size
        meta = _artifact_meta(out["targets"])
    counts = out["num_samples"] or {}
    spill = None
    if meta.get("max_samples") and meta.get("lda_dim") and "inter_locations" in counts:
        spill = counts["inter_locations"] * (4 * meta["lda_dim"] + 4)   # letkd.targets.spill: float32 z + int32 label
    return {"train_subset": subset or "all", "command": " ".join(cmd[1:]).replace(tmp, "<tmp>"),
            "wall_seconds": round(wall, 1), "fit_seconds": out["seconds"],
            "teacher_passes": counts.get("teacher_passes"),
            **{k: meta.get(k) for k in ("k_penult", "max_samples", "lda_dim", "k_sub")},
            "timings": out["timings"], "num_samples": counts, "peak_rss_mib": round(peak_kib / 1024, 1),
            "spill_bytes": spill, "artifact_bytes": size}


def _artifact_meta(path: str) -> dict:
    """The fit's settings, from the artifact it wrote."""
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True)["meta"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--subsets", type=int, nargs="+", default=[0], help="data.train_subset values (0: all)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--targets-dir", default="", help="keep the artifacts here (default: a temporary folder)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [measure(args.config, s, args.set, args.targets_dir) for s in args.subsets]
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    doc = {"command": "python " + " ".join(sys.argv), "machine": machine, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
