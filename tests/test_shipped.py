"""Shipped weights by name (fashion_mnist/resnet20): sha256-checked, weights_only, usable as a
teacher checkpoint, by `letkd evaluate NAME` and `letkd evaluate FILE`, and from Python."""
import dataclasses
import json

import pytest
import torch

from conftest import letkd_inproc, needs_fmnist


def test_create_with_shipped_weights_loads_the_checked_file():
    from letkd import models
    from letkd.models import shipped
    from letkd.models.weights import read_state_dict

    m = models.create("resnet20", weights="fashion_mnist")
    assert m.fc.out_features == 10 and m.conv1.in_channels == 1
    path = shipped.shipped_path("fashion_mnist/resnet20")
    assert path.parent.name == "fashion_mnist" and path.parent.parent.name == "weights"
    assert models.fingerprint(m) == models.fingerprint(read_state_dict(path))
    ck = torch.load(path, weights_only=True)            # an ordinary letkd checkpoint: config, data_info, model
    assert {"model", "config", "data_info"} <= set(ck) and ck["config"]["model"]["name"] == "resnet20"


def test_unknown_shipped_names_list_the_available_ones():
    from letkd import models
    from letkd.models.shipped import UnknownWeightsError, resolve_weights_source

    with pytest.raises(UnknownWeightsError, match="available: fashion_mnist/resnet20"):
        models.create("resnet20", weights="cifar100")
    with pytest.raises(UnknownWeightsError, match="fashion_mnist/resnet20"):
        resolve_weights_source("fashion_mnist/resnet99")
    with pytest.raises(ValueError, match="not both"):
        models.create("resnet20", weights="fashion_mnist", checkpoint="x.pt")


def test_a_damaged_shipped_file_is_refused(monkeypatch):
    from letkd.models import shipped

    entry = shipped.SHIPPED["fashion_mnist/resnet20"]
    monkeypatch.setitem(shipped.SHIPPED, entry.name, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(ValueError, match="sha256 .* expected 0000"):
        shipped.shipped_path(entry.name)


def test_models_lists_shipped_weights_with_their_accuracy():
    from letkd.models.shipped import SHIPPED

    _, out, _ = letkd_inproc("models")
    line = next(x for x in out.splitlines() if x.startswith("resnet20 "))
    assert f"fashion_mnist/resnet20 ({SHIPPED['fashion_mnist/resnet20'].test_acc:.2f} % test)" in line


@needs_fmnist
def test_evaluate_by_name_and_by_file_agree_and_the_teacher_is_strong():
    from letkd.models.shipped import shipped_path

    args = ["data.test_subset=1000", "train.test_batch_size=500"]
    by_name = json.loads(letkd_inproc("evaluate", "fashion_mnist/resnet20", *args)[1])
    by_file = json.loads(letkd_inproc("evaluate", shipped_path("fashion_mnist/resnet20"), *args)[1])
    assert by_name["acc"] == by_file["acc"] and by_name["count"] == 1000
    assert by_name["acc"] > 90.0      # a trained teacher (the full-test-set figure is in SHIPPED)
