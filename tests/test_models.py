"""The model zoo: every architecture on every offline dataset, assignment, bring-your-own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetkd.models import (
    ARCHITECTURES,
    MODEL_GROUPS,
    ModelError,
    assign_architectures,
    available_architectures,
    build_model,
    count_parameters,
)

OFFLINE = {"digits": ((1, 8, 8), "image"), "mnist1d": ((1, 40), "signal")}
SMALL = [name for name, arch in ARCHITECTURES.items() if arch.min_size < 28]


@pytest.mark.parametrize("dataset", sorted(OFFLINE))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_zoo_forward_shape_or_clear_refusal(name, dataset):
    shape, kind = OFFLINE[dataset]
    arch = ARCHITECTURES[name]
    if arch.inputs in ("any", kind):
        model = build_model(name, shape, 10)
        model.eval()
        assert model(torch.randn(3, *shape)).shape == (3, 10)
    else:
        with pytest.raises(ModelError, match=name):
            build_model(name, shape, 10)


def test_offline_datasets_each_have_at_least_five_distinct_architectures():
    assert len(available_architectures("image")) - len([n for n in ARCHITECTURES if ARCHITECTURES[n].min_size >= 28]) >= 5
    assert len(available_architectures("signal")) >= 5


@pytest.mark.parametrize("name", sorted(n for n, a in ARCHITECTURES.items() if a.min_size >= 28))
def test_torchvision_families_on_28x28_grey_images(name):
    model = build_model(name, (1, 28, 28), 10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_family_refuses_tiny_images_clearly():
    with pytest.raises(ModelError, match="at least 28x28"):
        build_model("resnet18", (1, 8, 8), 10)


def test_htfe_img_8_group_is_the_published_list():
    assert MODEL_GROUPS["htfe-img-8"] == [
        "cnn4", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"
    ]
    assert assign_architectures("round_robin", ["htfe-img-8"], 10)[8] == "cnn4"


def test_cnn4_matches_htfllib_on_28x28():
    model = build_model("cnn4", (1, 28, 28), 10)
    assert model.classifier[0].in_features == 1024  # 64 x 4 x 4, as in HtFLlib's FedAvgCNN for MNIST


def test_assignment_policies():
    archs = ["a", "b", "c"]
    assert assign_architectures("homogeneous", archs, 4) == ["a"] * 4
    assert assign_architectures("round_robin", archs, 5) == ["a", "b", "c", "a", "b"]
    assert assign_architectures("per_device", archs, 3) == archs
    assert assign_architectures("tiers", archs, 10, [0.5, 0.3, 0.2]) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    with pytest.raises(ModelError, match="per_device"):
        assign_architectures("per_device", archs, 4)
    with pytest.raises(ModelError, match="valid choices"):
        assign_architectures("random", archs, 4)


def factory(input_shape, num_classes):  # used by the bring-your-own-model test
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))


def not_a_model(input_shape, num_classes):
    return "nope"


def test_bring_your_own_model_by_dotted_path():
    model = build_model("tests.test_models:factory", (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert count_parameters(model) == 64 * 10 + 10
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model("tests.test_models:not_a_model", (1, 8, 8), 10)
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_module_xyz:factory", (1, 8, 8), 10)


def test_largest_architecture_is_the_biggest_state_that_fits_the_data():
    from hetkd.models import available_architectures, largest_architecture, state_bytes

    name, size = largest_architecture((1, 8, 8), 10)
    assert name == "resnet32"
    assert size == state_bytes(build_model("resnet32", (1, 8, 8), 10))
    for other in ("cnn_l", "resnet20", "mlp_l"):
        assert state_bytes(build_model(other, (1, 8, 8), 10)) < size
    signal_name, _ = largest_architecture((1, 40), 10)
    assert signal_name in available_architectures("signal")
