"""DDP on CPU (gloo): `letkd distill` under torchrun against one process, CRD memory across ranks,
distributed fit-targets, and the DDP plumbing (unused-parameter probe, sync_bn on CPU).

Tolerances (stated honestly): without SyncBatchNorm (unavailable on CPU in torch) each rank
normalises with the BatchNorm statistics of its own half of the global batch, so training is
not bit-identical to one process: per-epoch losses agree within 2 % and test accuracy within
5 points. The data order is the same (same images per epoch, same learning rates), and the
teacher targets fitted distributed are bit-identical to the single-process fit.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, needs_fmnist

PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"
SMALL = ["data.name=fashion_mnist", "data.train_subset=300", "data.test_subset=200", "train.batch_size=60",
         "train.test_batch_size=100", "train.precision=fp32", "train.channels_last=false", "train.progress=false",
         "train.lr=0.05", "train.schedule=multistep", "train.milestones=[2]", "train.threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A resnet8 teacher trained in-process for one epoch on 300 images."""
    from letkd import config
    from letkd.engine.trainer import run

    out = tmp_path_factory.mktemp("ddp_teacher") / "t"
    cfg = config.load(ROOT / "configs" / "fashion_mnist" / "resnet8.yaml",
                      SMALL + ["train.epochs=1", "run.tensorboard=false", f"run.dir={out}"])
    run(cfg)
    return out / "checkpoints" / "best.pt"


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@needs_fmnist
def test_torchrun_distill_matches_single_process(teacher, tmp_path):
    from letkd import config
    from letkd.engine.trainer import run

    args = SMALL + ["teacher.name=resnet8", f"teacher.checkpoint={teacher}", "train.epochs=2",
                    "method.k_penult=64", "method.max_samples=4000", "method.fit_batch_size=70",
                    "run.tensorboard=true"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run(config.load(PAIR / "letkd2.yaml", args + [f"run.dir={single}", f"method.targets_dir={tmp_path / 'tA'}"]))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "letkd", "distill", str(PAIR / "letkd2.yaml"), *args, f"run.dir={ddp}",
           f"method.targets_dir={tmp_path / 'tB'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count('"run_dir"') == 1  # the summary is printed by rank 0 only

    # the targets fitted over 2 ranks are exactly those of one process
    (fa,), (fb,) = list((tmp_path / "tA").iterdir()), list((tmp_path / "tB").iterdir())
    a, b = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
    assert a["num_samples"] == b["num_samples"]
    assert torch.equal(a["penult"]["centroids"], b["penult"]["centroids"])
    for k in ("mean", "W", "centres", "prototypes", "counts", "S"):
        assert torch.allclose(a["inter"][k].double(), b["inter"][k].double(), rtol=0, atol=1e-6), k

    # same data order: same images and learning rates per epoch; close losses and accuracy
    r1, r2 = _rows(single), _rows(ddp)
    assert [r["epoch"] for r in r2] == [1, 2]
    for x, y in zip(r1, r2):
        assert x["train_images"] == y["train_images"] == 300 and x["lr"] == y["lr"]
        for k in ("loss_ce", "loss_penult", "loss_inter"):
            assert abs(x[k] - y[k]) <= 0.02 * abs(x[k]), (k, x[k], y[k])
        assert abs(x["test_acc"] - y["test_acc"]) <= 5.0
    s = json.loads((ddp / "summary.json").read_text())
    assert s["world_size"] == 2 and s["last_acc"] == r2[-1]["test_acc"]

    # only rank 0 wrote files: one metrics file, one TensorBoard file, no temp files
    files = sorted(q.relative_to(ddp).as_posix() for q in ddp.rglob("*") if q.is_file())
    assert [f for f in files if not f.startswith("tb/")] == [
        "checkpoints/best.pt", "checkpoints/last.pt", "config.yaml", "metrics.jsonl", "summary.json"]
    assert len([f for f in files if f.startswith("tb/")]) == 1
    assert [q.name for q in (tmp_path / "tB").iterdir()] == [fb.name]


def _crd_worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    import torch.distributed as tdist

    from letkd.methods.crd import ContrastMemory

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _crd_steps(mode, rank, world)
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def _crd_steps(mode: str, rank: int, world: int) -> dict:
    """Two steps of a ContrastMemory on global batches of 7 (uneven split over 2 ranks)."""
    from letkd.data import rank_bounds
    from letkd.methods.crd import ContrastMemory

    torch.manual_seed(0)
    mem = ContrastMemory(8, 40, 12, 0.07, 0.5, mode=mode)
    g = torch.Generator().manual_seed(1)
    scores = []
    for step in range(2):
        v_s = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
        v_t = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
        index = torch.randperm(40, generator=g)[:7]
        labels = torch.randint(0, 4, (7,), generator=g)
        lo, hi = rank_bounds(7, rank, world)
        out_s, out_t, _ = mem(v_s[lo:hi], v_t[lo:hi], index[lo:hi], labels[lo:hi])
        scores.append((out_s, out_t))
    return {"state": {k: v.clone() for k, v in mem.state_dict().items()}, "scores": scores}


@pytest.mark.parametrize("mode", ["bank", "queue"])
def test_crd_memory_identical_across_ranks(mode, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_crd_worker, args=(2, _free_port(), mode, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    ref = _crd_steps(mode, 0, 1)  # one process, the whole global batch
    for k, v in ref["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k          # identical on both ranks
        assert torch.allclose(r0["state"][k].float(), v.float(), atol=1e-6), k  # = the single-process memory
    for step in range(2):  # each rank's scores are its rows of the single-process scores (same negatives)
        for j in range(2):
            assert torch.allclose(torch.cat([r0["scores"][step][j], r1["scores"][step][j]]), ref["scores"][step][j],
                                  atol=1e-6)


def test_unused_parameter_probe_and_sync_bn_on_cpu():
    from letkd import methods, models
    from letkd.config import ConfigError, load
    from letkd.engine.dist import DistInfo
    from letkd.engine.trainer import _has_unused_parameters, build_distiller
    from letkd.methods.base import Context

    info = SimpleNamespace(in_channels=1, image_size=(32, 32), num_classes=10)
    data = SimpleNamespace(info=info, batch_size=8, world_size=1)
    ctx = Context(num_classes=10, in_channels=1, num_train=100, student_arch="resnet8", teacher_arch="resnet8")
    flags = {}
    for name in ("kd", "simkd"):
        torch.manual_seed(0)
        d = methods.create(name, models.create("resnet8", 10, 1), models.create("resnet8", 10, 1), ctx)
        before = {k: v.clone() for k, v in d.state_dict().items()}
        flags[name] = _has_unused_parameters(d, data, torch.device("cpu"), "fp32", 1)
        assert all(torch.equal(before[k], v) for k, v in d.state_dict().items())  # the probe leaves no trace
        assert all(p.grad is None for p in d.parameters())
    assert flags == {"kd": False, "simkd": True}  # SimKD never uses the student's own classifier

    cfg = load(ROOT / "configs" / "fashion_mnist" / "resnet8.yaml", ["train.sync_bn=true"])
    dinfo = {"name": "fashion_mnist", "num_classes": 10, "in_channels": 1, "image_size": [32, 32], "num_train": 100}
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        build_distiller(cfg, dinfo, torch.device("cpu"), DistInfo(rank=0, world_size=2))
