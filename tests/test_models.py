import pytest
import torch

from models import MODELS, PackedDropout, ResidualBlock, build_model, count_parameters


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


def test_unknown_architecture_is_a_bug_not_a_new_model():
    with pytest.raises(KeyError, match="lenet"):
        build_model("lenet")


def test_dropout_is_the_identity_in_eval_mode():
    x = torch.randn(4, 512)
    assert PackedDropout(0.5).eval()(x) is x


@pytest.mark.parametrize("p", [0.25, 0.4, 0.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_keeps_one_minus_p_of_the_elements_scaled_to_keep_the_mean(p, channels_last):
    torch.manual_seed(0)
    x = torch.ones(64, 32, 14, 14, requires_grad=True)               # 401,408 elements
    inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = PackedDropout(p).train()(inputs)
    kept = y != 0
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005           # the standard deviation is below 0.001
    assert torch.allclose(y[kept], torch.tensor(1 / (1 - p)), atol=1e-4)
    assert abs(y.mean().item() - 1) < 0.01
    kept_per_channel = kept.float().mean((0, 2, 3))                   # no channel or position is favoured
    assert (kept_per_channel - (1 - p)).abs().max() < 0.03
    y.sum().backward()                                                 # the gradient flows through kept elements only
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(1 / (1 - p)), atol=1e-4)


def test_dropout_mask_follows_the_seed():
    x = torch.ones(8, 256)
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        masks.append(PackedDropout(0.25).train()(x) != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_dropout_off_the_cpu_runs_torchs_own():
    # CUDA and MPS cannot run here; the meta device takes the same branch and checks its shapes
    y = PackedDropout(0.25).train()(torch.ones(4, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 8)
