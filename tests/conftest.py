import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]

SUITE_THREADS = int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1))
torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _suite_threads():
    """Every test starts at the suite's thread count: a test module, an in-process CLI run
    (``train.threads``) or the fused step may have changed torch's global setting."""
    torch.set_num_threads(SUITE_THREADS)
    yield


def have_fmnist() -> bool:
    return FMNIST.is_dir() and any(FMNIST.glob("train-images*"))


needs_fmnist = pytest.mark.skipif(not have_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

# Small, fast Fashion-MNIST settings shared by the CLI integration tests.
TINY = ["data.name=fashion_mnist", "data.train_subset=600", "data.test_subset=200", "train.batch_size=60",
        "train.test_batch_size=100", "train.precision=fp32", "train.channels_last=false", "train.progress=false",
        "train.lr=0.05", "train.schedule=multistep", "train.milestones=[2]", "run.tensorboard=false"]


def letkd(*args, check=True, timeout=600, **kw):
    """Run the letkd CLI in a subprocess (as a user would); returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "letkd", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=kw.pop("cwd", None))
    if check and p.returncode != 0:
        raise AssertionError(f"letkd {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def letkd_inproc(*args, check=True):
    """Run the letkd CLI in this process (same code path as the command, without paying for a
    new interpreter and torch import); returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from letkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    if check and rc != 0:
        raise AssertionError(f"letkd {' '.join(map(str, args))} failed ({rc}):\n{out.getvalue()}\n{err.getvalue()}")
    return rc, out.getvalue(), err.getvalue()
