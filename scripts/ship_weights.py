"""Turn a finished run into shipped weights: src/letkd/weights/<dataset>/<arch>.pt.

    python scripts/ship_weights.py RUN_DIR [--checkpoint last]

Writes the run's LAST-epoch checkpoint (no selection on the test set) without optimiser/scheduler
state — still an ordinary letkd checkpoint that `letkd evaluate FILE` accepts — evaluates it on the
full test set and prints the sha256 and accuracy to record in letkd/models/shipped.py (SHIPPED).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

KEEP = ("version", "epoch", "config", "model", "data_info", "test_acc", "teacher_fingerprint")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--checkpoint", default="last", choices=["last", "best"])
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / "src" / "letkd" / "weights"))
    args = ap.parse_args()

    from letkd import data as datamod
    from letkd.engine.checkpoint import load_file, save_atomic
    from letkd.engine.trainer import evaluate, rebuild_deployable

    ck = load_file(Path(args.run_dir) / "checkpoints" / f"{args.checkpoint}.pt")
    slim = {k: ck[k] for k in KEEP if k in ck}
    # the state_dict as plain contiguous CPU tensors (no optimiser, no RNG, no scheduler state)
    slim["model"] = {k: v.detach().cpu().contiguous().clone() for k, v in ck["model"].items()}
    arch, dataset = ck["config"]["model"]["name"], ck["config"]["data"]["name"]
    out = Path(args.dest) / dataset / f"{arch}.pt"
    save_atomic(slim, out)
    model, cfg, _ = rebuild_deployable(load_file(out), "cpu")
    cfg.data.train_subset = cfg.data.test_subset = 0
    data = datamod.build(cfg.data, batch_size=cfg.train.batch_size, test_batch_size=500, device="cpu")
    res = evaluate(model, data.test_batches(), torch.device("cpu"))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(json.dumps({"file": str(out), "name": f"{dataset}/{arch}", "epoch": ck.get("epoch"), "sha256": digest,
                      "test_acc": round(res["acc"], 2), "test_images": res["count"],
                      "bytes": out.stat().st_size}, indent=2))


if __name__ == "__main__":
    main()
