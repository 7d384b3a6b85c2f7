"""`letkd quickstart` end to end on a tiny Fashion-MNIST protocol: teacher, targets, four students,
two seeds, each student re-evaluated alone from its checkpoint, the table with mean ± std."""
import json

from conftest import letkd_inproc, needs_fmnist

pytestmark = needs_fmnist


def test_quickstart_tiny(tmp_path) -> None:
    out = tmp_path / "qs"
    args = ["quickstart", "--out", out, "--train-subset", "300", "--test-subset", "200", "--epochs", "1",
            "--seeds", "0", "1", "--precision", "fp32"]
    letkd_inproc(*args)
    rows = json.loads((out / "quickstart.json").read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("vanilla", "kd", "dkd", "letkd2") for s in (0, 1)]
    for r in rows:
        s = json.loads((out / r["method"] / f"seed{r['seed']}" / "summary.json").read_text())
        # the student rebuilt from its checkpoint, without the teacher, scores what training measured last
        assert abs(r["acc_without_teacher"] - s["last_acc"]) < 1e-6
        assert (r["params_extra"] > 0) == (r["method"] == "letkd2")
    table = (out / "quickstart.md").read_text()
    assert "mean ± sample std over 2 seeds" in table and "| letkd2 |" in table
    # a second call reuses every finished run (the teacher by its recipe's fingerprint)
    mtime = (out / "letkd2" / "seed0" / "summary.json").stat().st_mtime
    letkd_inproc(*args)
    assert (out / "letkd2" / "seed0" / "summary.json").stat().st_mtime == mtime
