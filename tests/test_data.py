import dataclasses
import gzip
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, synthetic_mnist, write_idx
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import augmentation
import checkpoints
import cli
import data
from data import UserError
from models import build_model

# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_reads_gz_or_plain_idx_without_writing(tmp_path, gz):
    root = synthetic_mnist(tmp_path, n_train=30, n_test=10, gz=gz)
    before = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    images, labels = data.load_mnist(root, "train")
    assert images.shape == (30, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in range(30)]
    assert data.load_mnist(root, "test")[0].shape == (10, 28, 28)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == before


def test_idx_pixels_round_trip_exactly(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "x.gz", pixels, 2051)
    assert np.array_equal(data.read_idx(tmp_path / "x.gz", 2051).numpy(), pixels)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    root = synthetic_mnist(tmp_path, n_train=30)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[:-100]))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz: .*announces 30 items.*truncated or corrupt"):
        data.load_mnist(root)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    root = synthetic_mnist(tmp_path)
    path = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match="train-labels-idx1-ubyte.gz: cannot read"):
        data.load_mnist(root)


def test_wrong_magic_number_is_reported(tmp_path):
    root = synthetic_mnist(tmp_path)
    write_idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)), 2049)
    with pytest.raises(UserError, match="not an IDX image file"):
        data.load_mnist(root)


@pytest.mark.parametrize("labels, message", [(np.zeros(29), "30 images but 29 labels"),
                                             (np.zeros(0), "its header announces 0 items")])
def test_label_files_must_match_the_images(tmp_path, labels, message):
    root = synthetic_mnist(tmp_path, n_train=30)
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", labels, 2049)
    with pytest.raises(UserError, match=message):
        data.load_mnist(root)


def test_a_corrupt_deflate_stream_is_a_clear_error(tmp_path):
    root = synthetic_mnist(tmp_path, n_train=30)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    # inside the deflate stream, past the gzip header: zlib.error
    raw[20:60] = bytes(40)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz: cannot read"):
        data.load_mnist(root)


def test_missing_files_fall_back_to_torchvision_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(data, "download_mnist", lambda root,
                        split: calls.append((root, split)) or synthetic_mnist(root))
    images, _ = data.load_mnist(tmp_path, "train")
    assert calls == [(tmp_path, "train")] and len(images) == 40


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineMNIST:
        def __init__(self, *args, **kwargs):
            # torchvision's own message: one line per mirror tried
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a.example/mnist/, got:\n"
                               "<urlopen error [Errno -2] Name or service not known>\n)")

    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineMNIST)
    with pytest.raises(UserError, match="MNIST files not found in .* and the download failed") as caught:
        data.load_mnist(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "Name or service not known" in message and "--data-dir" in message


def test_scripts_print_line_by_line_into_a_pipe():
    # Python buffers a pipe's output in blocks: a log or a notebook cell would see the epochs only at the end
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    code = "import sys, cli; cli.run_cli(lambda: print(sys.stdout.line_buffering))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.stdout.strip() == "True", result.stderr


# ----------------------------------------------------------------------------- Kaggle CSV


def write_frame(path, rows, labelled=True):
    columns = (["label"] if labelled else []) + data.PIXEL_COLUMNS
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    return path


def good_rows(n, labelled=True, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 784))
    return np.column_stack([np.arange(n) % 10, pixels]) if labelled else pixels


def test_load_csv_returns_images_and_labels(tmp_path):
    rows = good_rows(12)
    images, labels = data.load_csv(write_frame(tmp_path / "train.csv", rows), labelled=True)
    assert images.shape == (12, 28, 28) and images.dtype == torch.uint8
    assert np.array_equal(images.reshape(12, -1).numpy(), rows[:, 1:])
    assert labels.tolist() == list(rows[:, 0])


def test_load_csv_unlabelled(tmp_path):
    images, labels = data.load_csv(write_frame(tmp_path / "test.csv", good_rows(5, False), False), labelled=False)
    assert images.shape == (5, 28, 28) and labels is None


def test_write_images_csv_round_trips(tmp_path):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.arange(7)
    data.write_images_csv(tmp_path / "t.csv", images, labels)
    back, back_labels = data.load_csv(tmp_path / "t.csv", labelled=True)
    assert torch.equal(back, images) and torch.equal(back_labels, labels)


def test_csv_errors_name_the_file_and_the_place(tmp_path):
    path = tmp_path / "train.csv"
    rows = good_rows(6).astype(object)
    rows[3, 6] = 300                                   # pixel5 of data row 3 = line 5 of the file
    write_frame(path, rows)
    with pytest.raises(UserError, match=r"train.csv: line 5, column pixel5: value 300 is not an integer in 0..255"):
        data.load_csv(path, labelled=True)

    rows = good_rows(6).astype(object)
    rows[1, 10] = "x"
    write_frame(path, rows)
    with pytest.raises(UserError, match=r"train.csv: line 3, column pixel9: value 'x' is not an integer"):
        data.load_csv(path, labelled=True)

    rows = good_rows(6).astype(float)
    rows[2, 100] = 12.5
    write_frame(path, rows)
    with pytest.raises(UserError, match=r"line 4, column pixel99: value 12.5"):
        data.load_csv(path, labelled=True)

    rows = good_rows(6).astype(float)
    rows[4, 1] = np.nan
    write_frame(path, rows)
    with pytest.raises(UserError, match=r"line 6, column pixel0: missing value"):
        data.load_csv(path, labelled=True)

    rows = good_rows(6)
    rows[0, 0] = 10
    write_frame(path, rows)
    with pytest.raises(UserError, match=r"line 2, column label: value 10 is not an integer in 0..9"):
        data.load_csv(path, labelled=True)


def test_csv_with_wrong_columns(tmp_path):
    path = tmp_path / "test.csv"
    write_frame(path, good_rows(3), labelled=True)   # a train.csv given where test.csv is expected
    with pytest.raises(UserError, match="test.csv: unexpected column label; expected the columns pixel0..pixel783"):
        data.load_csv(path, labelled=False)
    pd.DataFrame(good_rows(3, False)[:, :783], columns=data.PIXEL_COLUMNS[:783]).to_csv(path, index=False)
    with pytest.raises(UserError, match="missing column pixel783"):
        data.load_csv(path, labelled=False)
    with pytest.raises(UserError, match="missing column label"):
        data.load_csv(write_frame(tmp_path / "t.csv", good_rows(3, False), False), labelled=True)


def test_empty_header_only_and_missing_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty.csv: the file is empty"):
        data.load_csv(tmp_path / "empty.csv", labelled=False)
    (tmp_path / "header.csv").write_text(",".join(data.PIXEL_COLUMNS) + "\n")
    with pytest.raises(UserError, match="header.csv: has a header but no rows"):
        data.load_csv(tmp_path / "header.csv", labelled=False)
    with pytest.raises(UserError, match="nope.csv: no such file"):
        data.load_csv(tmp_path / "nope.csv", labelled=False)


def test_ragged_csv_is_reported(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(",".join(data.PIXEL_COLUMNS) + "\n" + ",".join(["0"] * 784) + "\n" + ",".join(["0"] * 790) + "\n")
    with pytest.raises(UserError, match="bad.csv: not a readable CSV"):
        data.load_csv(path, labelled=False)


def test_kaggle_default_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "KAGGLE_INPUT", tmp_path / "missing")
    assert str(data.default_kaggle_csv("train.csv")) == os.path.join("data", "digit-recognizer", "train.csv")
    monkeypatch.setattr(data, "KAGGLE_INPUT", tmp_path)
    assert data.default_kaggle_csv("test.csv") == tmp_path / "test.csv"


# ----------------------------------------------------------------------------- splits and batches


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = torch.arange(1000) % 10
    kept, held = data.stratified_split(labels, 0.1, seed=3)
    assert len(held) == 100 and len(kept) == 900
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert torch.bincount(labels[held]).tolist() == [10] * 10
    assert torch.equal(held, data.stratified_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, data.stratified_split(labels, 0.1, seed=4)[1])


def test_batch_indices_cover_every_image_once():
    batches = data.batch_indices(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    in_order = data.batch_indices(5, 2)  # slices: GPU data is indexed without a copy from the host
    assert all(isinstance(b, slice) for b in in_order)
    assert [list(range(5))[b] for b in in_order] == [[0, 1], [2, 3], [4]]


def test_prepare_batch_normalizes_with_mnist_statistics():
    images = torch.tensor([[[0, 255] * 14] * 28], dtype=torch.uint8)  # [1, 28, 28]
    x = data.prepare_batch(images, data.NORMALIZATION)
    assert x.shape == (1, 1, 28, 28)
    assert x[0, 0, 0, 0].item() == pytest.approx(-0.1307 / 0.3081)
    assert x[0, 0, 0, 1].item() == pytest.approx((1 - 0.1307) / 0.3081)


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def digits():
    """Four blurry synthetic strokes on a black 28x28 field, float [4, 1, 28, 28] in 0..1."""
    x = torch.zeros(4, 1, 28, 28)
    x[0, 0, 6:22, 12:16] = 1
    x[1, 0, 8:12, 5:23] = 1
    x[2, 0, 5:20, 5:20] = 0.5
    x[3, 0, 10:18, 9:15] = 1
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1)


@pytest.mark.parametrize("angle, tx, ty, scale, shear", [
    (10, 0, 0, 1, 0), (-15, 0, 0, 1, 0), (0, 2.8, -1.4, 1, 0), (0, 0, 0, 0.9, 0),
    (0, 0, 0, 1, 10), (12, -2.5, 1.5, 1.08, -7),
])
def test_batched_affine_matches_torchvision(digits, angle, tx, ty, scale, shear):
    expected = TF.affine(digits, angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                         interpolation=InterpolationMode.BILINEAR)
    def full(v):
        return torch.full((len(digits),), float(v))
    forward = augmentation.affine_matrices(full(angle), full(tx), full(ty), full(scale), full(shear))
    ours = augmentation.warp(digits, torch.linalg.inv(forward))
    assert (ours - expected).abs().max() < 1e-3


def test_each_sample_gets_its_own_parameters(digits):
    same = digits[:1].expand(8, -1, -1, -1)
    out = augmentation.augment(same, augmentation.strong_augmentation, torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 28, 28)
    assert len({round(v, 4) for v in out.sum((1, 2, 3)).tolist()}) == 8


def test_augmentation_is_reproducible_from_the_generator_seed(digits):
    def run(seed):
        return augmentation.augment(digits, augmentation.strong_augmentation, torch.Generator().manual_seed(seed))
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_augmentation_stays_within_its_ranges(digits):
    """Light augmentation moves the centre of mass by at most the translation range (plus rotation/scale slack)."""
    generator = torch.Generator().manual_seed(0)
    same = digits[3:4].expand(256, -1, -1, -1)
    out = augmentation.augment(same, augmentation.light_augmentation, generator)
    coords = torch.arange(28.0)
    centre_x = (out.sum(2).squeeze(1) * coords).sum(1) / out.sum((1, 2, 3))
    original = (same[0, 0].sum(0) * coords).sum() / same[0].sum()
    shift = (centre_x - original).abs()
    assert shift.max() <= 2.8 + 1.0
    assert shift.max() > 1.5  # and it really does move them


def test_identity_parameters_leave_images_unchanged(digits):
    n = len(digits)
    zeros = torch.zeros(n)
    identity = augmentation.affine_matrices(zeros, zeros, zeros, torch.ones(n), zeros)
    assert torch.allclose(augmentation.warp(digits, identity), digits, atol=1e-5)
    assert torch.allclose(augmentation.perspective_matrices(torch.zeros(n, 4, 2), 28), torch.eye(3).expand(n, 3, 3),
                          atol=1e-5)


def test_the_presets_draw_the_random_numbers_they_drew_before_the_writers_changes(digits):
    """strong: the affine's five draws, then the perspective's two, and nothing more (runs resume exactly)."""
    n, generator = len(digits), torch.Generator().manual_seed(7)
    out = augmentation.augment(digits, augmentation.strong_augmentation, generator)
    replay = torch.Generator().manual_seed(7)
    draws = [torch.rand(n, generator=replay) for _ in range(5)]
    offsets, chosen = torch.rand(n, 4, 2, generator=replay) * 0.2, torch.rand(n, 1, 1, generator=replay) < 0.5
    forward = augmentation.affine_matrices(draws[0] * 30 - 15, (draws[1] * 0.2 - 0.1) * 28, (draws[2] * 0.2 - 0.1) * 28,
                                           draws[3] * 0.2 + 0.9, draws[4] * 20 - 10)
    inverse = torch.linalg.inv(forward) @ augmentation.perspective_matrices(offsets * chosen, 28)
    assert torch.allclose(out, augmentation.warp(digits, inverse), atol=1e-5)
    assert torch.equal(generator.get_state(), replay.get_state())


def test_the_writers_changes_each_do_their_job(digits):
    ink = digits.sum((1, 2, 3))
    for change in (-1.0, 1.0):                           # finer and broader pens: less and more ink
        stroked = augmentation.restroke(digits, torch.full((4,), change), 1.0).sum((1, 2, 3))
        assert ((stroked - ink) * change > 0.1 * ink).all()
    assert torch.allclose(augmentation.restroke(digits, torch.zeros(4), 1.0).sum((1, 2, 3)), ink, rtol=0.05)
    only = dataclasses.replace(augmentation.Augmentation(), elastic=34.0)
    bent = augmentation.augment(digits, only, torch.Generator().manual_seed(0))
    assert not torch.allclose(bent, digits, atol=0.05)
    field = augmentation.elastic_field(64, 28, only, torch.Generator().manual_seed(0))    # [64, 28, 28, 2] pixels
    size = field.square().mean().sqrt()
    assert 0.5 < size < 3                                   # a pixel or two, as Simard et al.'s alpha 34, sigma 4
    assert (field[:, 1:] - field[:, :-1]).abs().mean() < 0.2 * size   # smooth: neighbours move together
    faint = augmentation.augment(digits, dataclasses.replace(augmentation.Augmentation(), contrast=0.6),
                                 torch.Generator().manual_seed(0))
    level = faint.amax((1, 2, 3)) / digits.amax((1, 2, 3))
    assert ((level >= 0.6 - 1e-6) & (level <= 1 + 1e-6)).all() and level.min() < 0.95
    blurred = augmentation.gaussian_blur(digits, 1.0)
    assert (blurred.amax((1, 2, 3)) < digits.amax((1, 2, 3))).all()
    assert torch.allclose(blurred.sum((1, 2, 3)), ink, rtol=0.01)          # blur spreads ink, loses none inside
    coarse = augmentation.augment(digits, dataclasses.replace(augmentation.Augmentation(), coarse=1.0),
                                  torch.Generator().manual_seed(0))
    interpolate = torch.nn.functional.interpolate
    small = interpolate(digits, size=19, mode="bilinear", antialias=True)                # two thirds of 28
    assert torch.allclose(coarse, interpolate(small, size=(28, 28), mode="bilinear"), atol=1e-6)
    out = augmentation.augment(digits, augmentation.writers_augmentation, torch.Generator().manual_seed(3))
    again = augmentation.augment(digits, augmentation.writers_augmentation, torch.Generator().manual_seed(3))
    assert out.shape == digits.shape and torch.equal(out, again) and 0 <= out.min() and out.max() <= 1 + 1e-6


def test_perspective_maps_moved_corners_back_to_the_image_corners():
    offsets = torch.tensor([[[0.2, 0.1], [0.0, 0.3], [0.1, 0.1], [0.25, 0.0]]])
    homography = augmentation.perspective_matrices(offsets, 28)[0]
    half = 13.5
    corners = torch.tensor([[-half, -half], [half, -half], [half, half], [-half, half]])
    moved = corners - torch.sign(corners) * offsets[0] * 14
    mapped = torch.cat([moved, torch.ones(4, 1)], 1) @ homography.T
    assert torch.allclose(mapped[:, :2] / mapped[:, 2:], corners, atol=1e-3)


# ----------------------------------------------------------------------------- device and precision


def test_device_pick_prefers_mps_then_cpu_without_cuda(monkeypatch):
    # CUDA first: tests/test_gpu_paths.py, with a faked GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert data.pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert data.pick_device("auto") == torch.device("cpu")
    assert data.pick_device("cpu") == torch.device("cpu")


def test_device_requests_that_cannot_be_met_are_user_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU"):
        data.pick_device("cuda")
    with pytest.raises(UserError, match="--device mps: Apple MPS is not available"):
        data.pick_device("mps")
    with pytest.raises(UserError, match="--device gpu0: not a device name"):
        data.pick_device("gpu0")


def test_precision_choice_on_cpu_and_mps(monkeypatch):
    # GPUs by their compute capability: tests/test_gpu_paths.py
    cpu, mps = torch.device("cpu"), torch.device("mps")
    monkeypatch.setattr(data, "cpu_supports_bf16", lambda: True)
    assert data.pick_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(data, "cpu_supports_bf16", lambda: False)
    assert data.pick_precision("auto", cpu) == "fp32"
    assert data.pick_precision("auto", mps) == "fp32"
    assert data.pick_precision("fp16", cpu) == "fp16"


def test_cpu_bf16_detection_reads_the_flags():
    assert data.cpu_supports_bf16("processor: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert data.cpu_supports_bf16("flags : sse2 amx_bf16\n")
    assert not data.cpu_supports_bf16("flags : sse2 avx2 avx512f\n")
    assert not data.cpu_supports_bf16("")


def test_autocast_runs_bf16_on_cpu_and_nothing_for_fp32():
    cpu = torch.device("cpu")
    layer = torch.nn.Linear(4, 4)
    with data.autocast(cpu, "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with data.autocast(cpu, "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


# ----------------------------------------------------------------------------- files and checkpoints


def test_atomic_path_leaves_old_file_intact_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_destination_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        cli.check_writable(tmp_path / "file" / "model.pth")
    with pytest.raises(UserError, match="cannot write"):
        cli.write_json(tmp_path / "file" / "x.json", {})


def make_checkpoint(arch="vgg"):
    model = build_model(arch)
    return {"model_state": model.state_dict(), "arch": arch, "normalization": dict(data.NORMALIZATION),
            "precision": "fp32", "epoch": 1, "metrics": {"val_loss": 0.5, "val_accuracy": 0.9},
            "versions": checkpoints.library_versions(), "complete": True}


def test_checkpoint_round_trip(tmp_path):
    checkpoint = make_checkpoint("widecnn")
    checkpoints.save(tmp_path / "m.pth", checkpoint)
    model, loaded = checkpoints.load_model(tmp_path / "m.pth", torch.device("cpu"))
    assert loaded["arch"] == "widecnn" and loaded["normalization"] == {"mean": 0.1307, "std": 0.3081}
    assert loaded["versions"]["torch"] == str(torch.__version__)
    for name, tensor in checkpoint["model_state"].items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert not model.training


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model_state": {}, "arch": "vgg", "payload": RunsCode()}, path)
    with pytest.raises(UserError, match=r"evil.pth: not a readable checkpoint \(.*(?i:global).*posix"):
        checkpoints.load(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_corrupt_and_foreign_checkpoints_are_user_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pth: not a readable checkpoint"):
        checkpoints.load(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError,
                       match="other.pth: not a checkpoint of this project .it needs model_state, arch, normalization"):
        checkpoints.load(tmp_path / "other.pth")
    with pytest.raises(UserError, match="absent.pth: no such checkpoint"):
        checkpoints.load(tmp_path / "absent.pth")


def test_weights_of_another_architecture_are_refused(tmp_path):
    checkpoint = make_checkpoint("resnet")
    checkpoint["arch"] = "vgg"
    checkpoints.save(tmp_path / "mixed.pth", checkpoint)
    with pytest.raises(UserError, match="mixed.pth: weights do not fit the vgg architecture"):
        checkpoints.load_model(tmp_path / "mixed.pth", torch.device("cpu"))
    checkpoint["arch"] = "lenet"
    checkpoints.save(tmp_path / "unknown.pth", checkpoint)
    with pytest.raises(UserError, match="unknown architecture 'lenet'"):
        checkpoints.load_model(tmp_path / "unknown.pth", torch.device("cpu"))
