import pytest
import torch

from models import MODELS, ResidualBlock, build_model, count_parameters


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_maps_a_batch_to_ten_logits(name):
    model = build_model(name).eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name, features, shape", [
    ("vgg", lambda m: m.features, (128, 7, 7)),
    ("widecnn", lambda m: m.features, (256, 4, 4)),
    ("resnet", lambda m: torch.nn.Sequential(m.stem, m.layer1, m.layer2, m.layer3), (256, 7, 7)),
])
def test_feature_maps_have_the_specified_shape(name, features, shape):
    model = build_model(name).eval()
    assert features(model)(torch.randn(2, 1, 28, 28)).shape == (2, *shape)


def test_vgg_head_starts_from_6272_features_and_widecnn_from_4096():
    assert build_model("vgg").head[1].in_features == 6272
    assert build_model("widecnn").head[1].in_features == 4096


def test_residual_block_uses_projection_only_when_shape_changes():
    assert isinstance(ResidualBlock(64, 64).shortcut, torch.nn.Identity)
    assert isinstance(ResidualBlock(32, 64).shortcut, torch.nn.Sequential)
    assert ResidualBlock(64, 128, stride=2)(torch.randn(1, 64, 14, 14)).shape == (1, 128, 7, 7)


def test_parameter_counts_are_distinct_and_in_the_millions():
    counts = {name: count_parameters(build_model(name)) for name in MODELS}
    assert all(2_000_000 < c < 5_000_000 for c in counts.values()), counts
    assert len(set(counts.values())) == 3


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'lenet'"):
        build_model("lenet")
