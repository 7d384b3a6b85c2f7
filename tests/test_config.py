"""Config loading: YAML + overrides, inheritance, validation with helpful errors."""
import pytest

from letkd import config
from letkd.config import ConfigError


def test_defaults_and_overrides():
    cfg = config.load(None, ["train.epochs=3", "train.milestones=[1,2]", "data.train_subset=100", "train.lr=0.1"])
    assert cfg.train.epochs == 3 and cfg.train.milestones == [1, 2] and cfg.data.train_subset == 100
    assert cfg.train.lr == 0.1 and isinstance(cfg.train.lr, float)
    assert cfg.method == {"name": "vanilla", "label_smoothing": 0.0}


def test_inherit_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 10\n  lr: 0.5\nmodel:\n  name: resnet8\n")
    (tmp_path / "child.yaml").write_text("inherit: base.yaml\ntrain:\n  epochs: 20\n")
    cfg = config.load(tmp_path / "child.yaml", ["train.lr=0.01"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.name) == (20, 0.01, "resnet8")


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["train.epochz=3"])
    msg = str(e.value)
    assert "train.epochz" in msg and "epochs" in msg and "batch_size" in msg


def test_unknown_section_and_method_param():
    with pytest.raises(ConfigError, match="valid sections"):
        config.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="label_smoothing"):
        config.load(None, ["method.temperature=4"])
    with pytest.raises(ConfigError, match="not a known method"):
        config.load(None, ["method.name=nonexistent"])


@pytest.mark.parametrize("override,needle", [
    ("train.epochs=abc", "expected an integer"),
    ("train.epochs=0", "out of range"),
    ("train.momentum=1.5", "out of range"),
    ("train.precision=fp64", "choose one of"),
    ("train.nesterov=maybe", "true or false"),
    ("data.name=mnist", "choose one of"),
    ("train.milestones=5", "expected a list"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError, match=needle):
        config.load(None, [override])


def test_configs_cannot_execute_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(evil)
    assert not marker.exists()


def test_switch_method_drops_other_params(tmp_path):
    (tmp_path / "c.yaml").write_text("method:\n  name: vanilla\n  label_smoothing: 0.1\n")
    cfg = config.load(tmp_path / "c.yaml", ["method.name=vanilla"])
    assert cfg.method["label_smoothing"] == 0.1


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        config.parse_overrides(["epochs"])


def test_shipped_configs_validate():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = [p for p in root.rglob("*.yaml") if not p.name.startswith("_") and p.parent.name != "sweeps"]
    assert files
    for p in files:
        config.load(p)
