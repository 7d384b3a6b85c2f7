"""Reliability and security (issue 5): exact resume after SIGKILL (distill with letKD, sweeps), atomic
writes, safe loading, and a clear `letkd: error: ...` (exit 2, no traceback) for each kind of bad input.

Speed: the runs read a 600/100-image Fashion-MNIST copy written as raw idx files into a temp data root
(no gunzip of the 60k set per run), use resnet8 (teacher and student) on 1 thread, and most
error cases call ``letkd.cli.main`` in-process (the same code path as the command, minus ~10 s of
imports); the kill tests and one error test run the real command in a subprocess.
See docs/guarantees.md for what each test proves.
"""
import csv
import gzip
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import FMNIST, ROOT, letkd, needs_fmnist
from letkd.cli import main
from letkd.engine.checkpoint import load_file

pytestmark = needs_fmnist
RES8 = ROOT / "configs" / "fashion_mnist" / "resnet8.yaml"
PAIR = ROOT / "configs" / "fashion_mnist" / "resnet20_resnet8"
N_TRAIN, N_TEST = 600, 100


# ----------------------------------------------------------------------------------- helpers
class _Evil:
    """Unpickling this creates ``marker``: if the file appears, loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory):
    """The first 600 train / 100 test Fashion-MNIST images as raw idx files (where the loader looks first)."""
    root = tmp_path_factory.mktemp("fm")
    out = root / "FashionMNIST" / "raw"
    out.mkdir(parents=True)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte"
            raw = gzip.decompress((FMNIST / f"{name}.gz").read_bytes())
            nd = raw[3]
            shape = (n, *struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])[1:])
            body = raw[4 + 4 * nd: 4 + 4 * nd + int(np.prod(shape))]
            (out / name).write_bytes(raw[:4] + struct.pack(f">{nd}I", *shape) + body)
    return root


@pytest.fixture(scope="module")
def fast(fm_root):
    return [f"data.root={fm_root}", "data.name=fashion_mnist", "train.batch_size=60", "train.test_batch_size=100",
            "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.lr=0.05",
            "train.schedule=multistep", "train.milestones=[2]", "run.tensorboard=false", "train.threads=1"]


def cli(*args):
    """``letkd ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def expect_error(*args, needles=()):
    """The command fails with exit 2 and one `letkd: error:` message holding every needle, no traceback."""
    rc, out, err = cli(*args)
    assert rc == 2, f"expected exit 2, got {rc}\n{out}\n{err}"
    assert "letkd: error:" in err and "Traceback" not in err, err
    msg = err[err.index("letkd: error:"):]
    for n in needles:
        assert str(n) in msg, f"{n!r} not in the message:\n{msg}"
    return msg


@pytest.fixture(scope="module")
def teacher(fast, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "t"
    rc, _, err = cli("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", f"run.dir={run}")
    assert rc == 0, err
    return run


@pytest.fixture(scope="module")
def distill_args(fast, teacher, tmp_path_factory):
    targets_dir = tmp_path_factory.mktemp("targets")
    return ["distill", str(PAIR / "letkd2.yaml"), *fast, "teacher.name=resnet8",
            f"teacher.checkpoint={teacher / 'checkpoints' / 'best.pt'}", "method.k_penult=64", "method.max_samples=0",
            f"method.targets_dir={targets_dir}", "train.epochs=3"]


@pytest.fixture(scope="module")
def letkd2_ref(distill_args, tmp_path_factory):
    """An uninterrupted letkd2 distillation (3 epochs); it also fits the cached targets file."""
    run = tmp_path_factory.mktemp("ref") / "run"
    rc, _, err = cli(*distill_args, f"run.dir={run}")
    assert rc == 0, err
    targets = sorted(Path(next(a for a in distill_args if a.startswith("method.targets_dir="))
                          .split("=", 1)[1]).glob("*.pt"))
    assert len(targets) == 1
    return run, targets[0]


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "letkd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------- 1. kill and resume
def test_distill_letkd2_sigkill_mid_epoch_then_resume_is_exact(distill_args, letkd2_ref, tmp_path):
    ref, _ = letkd2_ref
    run = tmp_path / "killed"
    proc = _popen([*distill_args, f"run.dir={run}"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            time.sleep(0.4 * _rows(run)[0]["train_seconds"])  # into the middle of epoch 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert load_file(run / "checkpoints" / "last.pt")["epoch"] < 3, "the kill came too late to test anything"
    assert not (run / "summary.json").exists()
    wall_killed = load_file(run / "checkpoints" / "last.pt")["wall_seconds"]   # the first process's, to its checkpoint
    assert wall_killed > 0

    rc, out, err = cli(*distill_args, f"run.dir={run}", "--resume")
    assert rc == 0, err
    assert "resuming" in out
    a, b = load_file(ref / "checkpoints" / "last.pt"), load_file(run / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert any(k.startswith("kd_layers.") for k in a["model"])
    for part in ("model", "distiller"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    assert a["scheduler"] == b["scheduler"]
    skip = {"train_seconds", "images_per_second"}
    ra, rb = ([{k: v for k, v in r.items() if k not in skip} for r in _rows(x)] for x in (ref, run))
    assert ra == rb and {"loss_penult", "loss_inter"} <= set(ra[0])
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (ref, run))
    assert (sa["best_acc"], sa["last_acc"], sa["best_epoch"]) == (sb["best_acc"], sb["last_acc"], sb["best_epoch"])
    assert sb["wall_seconds"] > wall_killed   # wall time adds up over the processes of a resumed run
    assert sb["threads"] >= 1 and sb["cpu"]


def test_sweep_killed_between_runs_continues(fast, tmp_path):
    out = tmp_path / "sweep"
    common = [*fast, "data.train_subset=300", "train.epochs=1"]
    spec = {"out": str(out), "seeds": [0], "overrides": common,
            "runs": [{"label": "first", "config": str(RES8)},
                     {"label": "second", "config": str(RES8), "overrides": ["train.lr=0.02"]}]}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    proc = _popen(["sweep", sweep])
    first, second = out / "first" / "seed0", out / "second" / "seed0"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (first / "summary.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert (first / "summary.json").exists() and not (second / "summary.json").exists()
    before = (first / "summary.json").read_text()

    rc, stdout, err = cli("sweep", sweep, "--tables")      # tables so far; nothing runs
    assert rc == 0, err
    assert "| first |" in stdout and "| second |" in stdout and "(+1 pending)" in stdout
    assert not (second / "summary.json").exists() and "running" not in stdout
    rc, _, err = cli("sweep", sweep, "--tables", "--only", "second")  # --only would be silently ignored: refused
    assert rc == 2 and "--only and --dry-run do not apply" in err

    rc, stdout, err = cli("sweep", sweep)
    assert rc == 0, err
    assert "first seed 0: done, skipped" in stdout and "second seed 0: running" in stdout
    assert (first / "summary.json").read_text() == before  # not re-run
    assert json.loads((second / "summary.json").read_text())["epochs"] == 1
    table = (out / "results.md").read_text()
    assert "| first |" in table and "| second |" in table and "pending" not in table
    # wall time per run in the tables: the run's own summary figure
    with open(out / "results.csv") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    wall = json.loads((second / "summary.json").read_text())["wall_seconds"]
    assert float(rows["second"]["wall_seconds_mean"]) == pytest.approx(wall)
    assert f"{wall / 60:.1f} min" in table


def test_sweep_processes_share_a_sweep_through_run_locks(fast, tmp_path):
    """A run locked by a live process is skipped; a lock whose process is gone is taken over, the
    run trained and the lock removed; claim/release keep to their own lock."""
    import socket

    from letkd.sweep import LOCK, claim, release

    out = tmp_path / "sweep"
    spec = {"out": str(out), "seeds": [0], "overrides": [*fast, "data.train_subset=300", "train.epochs=1"],
            "runs": [{"label": "busy", "config": str(RES8)}, {"label": "stale", "config": str(RES8)}]}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    busy, stale = out / "busy" / "seed0", out / "stale" / "seed0"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])   # a live "sweep process"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        host = socket.gethostname()
        for d, pid in ((busy, other.pid), (stale, gone.pid)):
            d.mkdir(parents=True)
            (d / LOCK).write_text(f"{host} {pid}")
        rc, stdout, err = cli("sweep", sweep)
        assert rc == 0, err
        assert f"busy seed 0: being run by another sweep process ({host} {other.pid}), skipped" in stdout
        assert not (busy / "summary.json").exists() and (busy / LOCK).read_text() == f"{host} {other.pid}"
        assert "stale seed 0: running" in stdout and (stale / "summary.json").exists()
        assert not (stale / LOCK).exists()
        assert claim(busy) == f"{host} {other.pid}"
        release(busy)                                   # not ours: left alone
        assert (busy / LOCK).exists()
    finally:
        other.kill()
        other.wait()
    assert claim(busy) is None                          # its process is gone now: taken over
    assert (busy / LOCK).read_text() == f"{host} {os.getpid()}"
    release(busy)
    assert not (busy / LOCK).exists()


# ------------------------------------------------------------------------ 2. atomic writes
_CHILD = """
import os, signal, sys, torch
from letkd.engine import checkpoint
path = sys.argv[1]
checkpoint.save_atomic({"epoch": 1, "w": torch.arange(1_000_000.0)}, path)
real_save = torch.save
def dying_save(obj, f, *a, **k):          # the process is SIGKILLed half-way through writing
    import io
    buf = io.BytesIO(); real_save(obj, buf, *a, **k); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(1_000_000)}, path)
"""


def test_sigkill_while_writing_checkpoint_keeps_previous(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    p = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = load_file(path)  # the previous, complete file
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(1_000_000.0))
    # the half-written temp file is a separate (hidden) file, never last.pt itself
    assert [f.name for f in path.parent.iterdir() if f.name != "last.pt"] == \
        [f.name for f in path.parent.glob(".last.pt.*.tmp")]


def test_corrupted_last_pt_on_resume_names_file_subprocess(fast, teacher, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(teacher, run)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    p = letkd("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", f"run.dir={run}", "--resume",
              check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "letkd: error:" in p.stderr and str(last) in p.stderr and "truncated or corrupted" in p.stderr


def test_truncated_targets_file_names_file(distill_args, letkd2_ref, tmp_path):
    _, targets = letkd2_ref
    bad = tmp_path / "targets.pt"
    data = targets.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    expect_error(*distill_args, f"method.targets={bad}", "train.epochs=1", f"run.dir={tmp_path / 'r'}",
                 needles=[bad, "truncated or corrupted", "fit the targets again"])


# ------------------------------------------------------------------------- 3. safe loading
def test_malicious_teacher_checkpoint_refused(distill_args, tmp_path):
    marker, evil = tmp_path / "ran", tmp_path / "evil_teacher.pt"
    torch.save({"model": _Evil(marker)}, evil)
    expect_error(*distill_args, f"teacher.checkpoint={evil}", f"run.dir={tmp_path / 'r'}",
                 needles=[evil, "refused", "weights_only=True"])
    assert not marker.exists()


def test_malicious_resume_checkpoint_refused(fast, teacher, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(teacher, run)
    marker, last = tmp_path / "ran", run / "checkpoints" / "last.pt"
    torch.save({"epoch": 1, "distiller": _Evil(marker)}, last)
    expect_error("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", f"run.dir={run}",
                 "--resume", needles=[last, "refused"])
    assert not marker.exists()


def test_malicious_targets_file_refused(distill_args, tmp_path):
    marker, evil = tmp_path / "ran", tmp_path / "evil_targets.pt"
    torch.save({"format": "letkd-targets", "meta": {}, "penult": _Evil(marker)}, evil)
    expect_error(*distill_args, f"method.targets={evil}", f"run.dir={tmp_path / 'r'}", needles=[evil, "refused"])
    assert not marker.exists()


def test_malicious_dataset_pickle_refused(fast, tmp_path):
    marker = tmp_path / "ran"
    _write_cifar(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    expect_error("train-teacher", RES8, *_cifar(fast, tmp_path), needles=["cifar-100-python/train", "refused"])
    assert not marker.exists()


# ----------------------------------------------------------------------- 4. bad input (config)
def test_config_errors(fast, tmp_path):
    expect_error("train-teacher", RES8, *fast, "train.epoch=3",
                 needles=["unknown config key(s) train.epoch", "valid keys in train:", "epochs"])
    expect_error("train-teacher", RES8, *fast, "train.epochs=three", needles=["train.epochs", "expected an integer"])
    expect_error("train-teacher", RES8, *fast, "train.momentum=1.5", needles=["train.momentum=1.5", "out of range"])
    expect_error("train-teacher", RES8, *fast, "train.precision=fp8", needles=["train.precision", "fp32"])
    expect_error("train-teacher", RES8, *fast, "train.lr=.nan", needles=["train.lr", "finite"])
    expect_error("distill", PAIR / "letkd2.yaml", *fast, "method.k_penul=64", needles=["method.k_penul", "k_penult"])
    from letkd import config  # YAML 1.1 reads 1e-3 as a string: accepted as the number it is
    assert config.load(RES8, ["train.lr=1e-3", "train.weight_decay=5e-4"]).train.lr == 1e-3


# ----------------------------------------------------------------------- 4. bad input (data)
def _write_cifar(root, n=20, labels=None):
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        obj = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"fine_labels": list(labels if labels is not None else [i % 100 for i in range(n)])}
        (d / split).write_bytes(pickle.dumps(obj, protocol=2))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}, protocol=2))
    return d


def _cifar(fast, root):
    return [*[o for o in fast if not o.startswith(("data.root", "data.name"))], "data.name=cifar100",
            f"data.root={root}", "data.download=false", "train.epochs=1", f"run.dir={Path(root) / 'run'}"]


def test_missing_dataset_says_where_and_how(fast, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error("train-teacher", RES8, *_cifar(fast, empty),
                 needles=["CIFAR-100", "not found", "Looked in", empty / "cifar-100-python", "To get it",
                          "cifar-100-python.tar.gz", "data.download=false"])


def test_dataset_file_of_wrong_format(fast, tmp_path):
    d = _write_cifar(tmp_path)
    (d / "train").write_bytes(b"this is not a CIFAR pickle" * 40)
    expect_error("train-teacher", RES8, *_cifar(fast, tmp_path), needles=[d / "train", "not a readable CIFAR"])


def test_out_of_range_labels_rejected(fast, tmp_path):
    d = _write_cifar(tmp_path, labels=[150] + list(range(1, 20)))
    expect_error("train-teacher", RES8, *_cifar(fast, tmp_path), needles=[d / "train", "0..99", "150"])


def test_image_folder_test_classes_must_match_train(fast, tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "cow"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / c / "a.png")
    args = [o for o in fast if not o.startswith(("data.root", "data.name"))]
    expect_error("train-teacher", RES8, *args, "data.name=image_folder", f"data.train_dir={tmp_path / 'train'}",
                 f"data.test_dir={tmp_path / 'test'}", f"run.dir={tmp_path / 'run'}",
                 needles=[tmp_path / "test", "missing: ['dog']", "unexpected: ['cow']"])


def test_data_build_checks_label_range():
    from letkd.data import _check_labels
    from letkd.data.formats import DataFormatError

    _check_labels(torch.tensor([0, 9]), 10, "x")
    with pytest.raises(DataFormatError, match=r"0\.\.9, found 2 out of range \(e\.g\. 10\)"):
        _check_labels(torch.tensor([0, 10, -1]), 10, "x")


# ------------------------------------------------------------------ 4. bad input (models, taps)
def test_teacher_checkpoint_for_another_architecture(distill_args, tmp_path):
    expect_error(*distill_args, "teacher.name=resnet20", f"run.dir={tmp_path / 'r'}",
                 needles=["do not fit resnet20", "missing keys", "layer1.1.conv1.weight", "another architecture"])


def test_teacher_checkpoint_for_another_class_count(distill_args, tmp_path):
    from letkd import models

    ck = tmp_path / "t100.pt"
    torch.save({"model": models.create("resnet8", num_classes=100, in_channels=1).state_dict()}, ck)
    expect_error(*distill_args, f"teacher.checkpoint={ck}", f"run.dir={tmp_path / 'r'}",
                 needles=[ck, "fc.weight expected (10, 64) found (100, 64)", "num_classes=100"])


def test_targets_file_for_another_teacher_and_data(distill_args, letkd2_ref, teacher, tmp_path):
    _, targets = letkd2_ref
    sd = load_file(teacher / "checkpoints" / "best.pt")["model"]
    other = tmp_path / "other_teacher.pt"
    torch.save({"model": {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}}, other)
    expect_error(*distill_args, f"teacher.checkpoint={other}", f"method.targets={targets}", "data.train_subset=300",
                 f"run.dir={tmp_path / 'r'}",
                 needles=[targets, "made for another setting", "teacher_fingerprint: file has", "num_train: file has 600",
                          "this run has 300"])


@pytest.mark.parametrize("tap,needles", [
    ("method.student_penult_tap=fc", ["student_penult_tap='fc'", "(10,)", "C×H×W feature map"]),
    ("method.student_inter_tap=layer9.conv", ["'layer9.conv' does not exist", "letkd taps"]),
])
def test_taps_that_do_not_fit(distill_args, tmp_path, tap, needles):
    expect_error(*distill_args, tap, f"run.dir={tmp_path / 'r'}", needles=needles)


def test_fitnet_tap_that_is_not_a_feature_map(distill_args, tmp_path):
    args = [a for a in distill_args if not str(a).startswith("method.")]
    args[1] = str(PAIR / "fitnet.yaml")
    expect_error(*args, "method.tap=fc", f"run.dir={tmp_path / 'r'}",
                 needles=["method.tap='fc'", "(10,)", "C×H×W feature map"])


# Protected run directories (another run there: refused unless --resume / --overwrite) are tested
# by tests/test_cli.py::test_existing_run_dir_is_protected.


# ---------------------------------------------------------------------------- 4. NaN / inf
def test_huge_lr_stops_with_step(fast, tmp_path):
    expect_error("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", "train.lr=1e30",
                 f"run.dir={tmp_path / 'r'}", needles=["non-finite loss at epoch 1, step", "lower train.lr"])


def test_nan_in_epoch_two_keeps_epoch_one_checkpoint(fast, tmp_path, monkeypatch):
    from letkd.engine import trainer

    real = trainer._TrainStep.forward

    def poisoned(self, images, labels, **batch):  # fault injection: the loss turns NaN at epoch 2, step 2
        logits, losses = real(self, images, labels, **batch)
        if batch["epoch"] == 2:
            poisoned.calls += 1
            if poisoned.calls == 3:
                losses = {k: v * float("nan") for k, v in losses.items()}
        return logits, losses

    poisoned.calls = 0
    monkeypatch.setattr(trainer._TrainStep, "forward", poisoned)
    run = tmp_path / "r"
    expect_error("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=3", f"run.dir={run}",
                 needles=["non-finite loss at epoch 2, step 2", "last good checkpoint is kept"])
    ck = load_file(run / "checkpoints" / "last.pt")
    best = load_file(run / "checkpoints" / "best.pt")
    assert ck["epoch"] == 1 and best["epoch"] == 1
    for k, v in ck["model"].items():
        assert torch.isfinite(v.float()).all() and torch.equal(v, best["model"][k]), k
    assert [r["epoch"] for r in _rows(run)] == [1] and not (run / "summary.json").exists()
    monkeypatch.undo()
    # ... and the run continues from it
    rc, out, err = cli("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=3", f"run.dir={run}",
                       "--resume")
    assert rc == 0 and "resuming" in out and "from epoch 1" in out, err
    assert [r["epoch"] for r in _rows(run)] == [1, 2, 3]


# ------------------------------------------------------ checkpoints and run files that are not what they claim
def test_evaluate_plain_state_dict_is_clear_error(teacher, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"model": load_file(teacher / "checkpoints" / "best.pt")["model"]}, plain)
    expect_error("evaluate", plain, needles=[plain, "not a letkd checkpoint"])


def test_resume_from_non_training_checkpoint_is_clear_error(fast, teacher, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(teacher, run)
    last = run / "checkpoints" / "last.pt"
    torch.save({"model": load_file(last)["model"]}, last)  # a valid file, but not a training checkpoint
    expect_error("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", f"run.dir={run}",
                 "--resume", needles=[last, "distiller"])


def test_resume_with_torn_config_yaml_is_clear_error(fast, teacher, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(teacher, run)
    (run / "config.yaml").write_text("data:\n  name: fashion_mnist\ntrain: {epochs: [")  # torn by a kill
    expect_error("train-teacher", RES8, *fast, "data.train_subset=300", "train.epochs=1", f"run.dir={run}",
                 "--resume", needles=[run / "config.yaml"])
