"""The CUDA and MPS paths, tested on the CPU: fake device properties, resume across machines, no host reads.

Real GPUs are checked by `make gpu-check` (tools/gpu_check.py); its logic is tested here with --device cpu.
"""
import json
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from conftest import ROOT, assert_user_error, random_steps, run_script, synthetic_mnist

import augmentation
import checkpoints
import data
from data import UserError
from models import build_model
import predict_tta
import train_cnn

GPUS = {  # name: (capability, what Kaggle or a cloud offers it as)
    "Tesla P100-PCIE-16GB": (6, 0), "Tesla V100-SXM2-16GB": (7, 0), "Tesla T4": (7, 5), "NVIDIA A100-SXM4-40GB": (8, 0),
    "NVIDIA L4": (8, 9), "NVIDIA H100 80GB HBM3": (9, 0),
}
# What torch 2.14's CUDA 13 wheel reports (no Pascal or Volta kernels), and a CUDA 12.6 wheel, which still has them.
CURRENT_BUILD = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CUDA12_BUILD = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


class FakeCuda:
    """torch.cuda as a machine with `count` GPUs of one kind shows it; set_device refuses an unindexed device, as
    torch does."""

    def __init__(self, monkeypatch, name="Tesla T4", count=1, arch_list=CURRENT_BUILD):
        self.name, self.capability, self.count, self.current, self.set_calls = name, GPUS[name], count, 0, []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: self.capability)
        monkeypatch.setattr(cuda, "get_device_name", lambda device=None: self.name)
        monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
            name=self.name, major=self.capability[0], minor=self.capability[1], total_memory=16 * 2**30))
        monkeypatch.setattr(cuda, "get_arch_list", lambda: list(arch_list))
        monkeypatch.setattr(cuda, "is_bf16_supported", self.is_bf16_supported)
        monkeypatch.setattr(cuda, "set_device", self.set_device)

    def is_bf16_supported(self, including_emulation=True):
        # torch: True from capability 8.0; below it, True as well unless emulation is excluded
        return self.capability[0] >= 8 or including_emulation

    def set_device(self, device):
        if isinstance(device, torch.device):
            if device.index is None:
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            device = device.index
        if not 0 <= device < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = device
        self.set_calls.append(device)


# ----------------------------------------------------------------------------- device and precision


@pytest.mark.parametrize("name, precision", [("Tesla T4", "fp16"), ("Tesla V100-SXM2-16GB", "fp16"),
                                             ("NVIDIA A100-SXM4-40GB", "bf16"), ("NVIDIA L4", "bf16"),
                                             ("NVIDIA H100 80GB HBM3", "bf16")])
def test_auto_precision_is_native_bf16_from_capability_8_else_fp16(monkeypatch, capsys, name, precision):
    FakeCuda(monkeypatch, name, arch_list=CUDA12_BUILD)
    device = data.pick_device("auto")
    assert data.pick_precision("auto", device) == precision
    assert not capsys.readouterr().err


def test_explicit_bf16_on_a_gpu_that_emulates_it_gets_a_one_line_note(monkeypatch, capsys):
    FakeCuda(monkeypatch, "Tesla T4")
    assert data.pick_precision("bf16", data.pick_device("cuda")) == "bf16"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: --precision bf16 on this GPU is emulated")
    FakeCuda(monkeypatch, "NVIDIA A100-SXM4-40GB")
    assert data.pick_precision("bf16", data.pick_device("cuda")) == "bf16"
    assert not capsys.readouterr().err


def test_cuda_devices_are_indexed_and_made_current(monkeypatch):
    gpus = FakeCuda(monkeypatch, "Tesla T4", count=2)
    assert data.pick_device("cuda") == torch.device("cuda", 0)
    assert data.pick_device("cuda", 1) == torch.device("cuda", 1)        # torchrun's LOCAL_RANK 1
    assert data.pick_device("auto", 1) == torch.device("cuda", 1)
    assert data.pick_device("cuda:1") == torch.device("cuda", 1)
    assert gpus.set_calls == [0, 1, 1, 1] and gpus.current == 1


def test_an_explicit_index_under_torchrun_and_a_rank_past_the_gpus_are_one_line(monkeypatch):
    FakeCuda(monkeypatch, "Tesla T4", count=2)
    with pytest.raises(UserError,
                       match=r"--device cuda:1 under torchrun would put every rank on that one GPU; "
                             r"pass --device cuda"):
        data.pick_device("cuda:1", local_rank=0)
    with pytest.raises(UserError, match=r"torchrun's LOCAL_RANK is 2, but this machine shows 2 CUDA GPU\(s\) \(0..1\)"):
        data.pick_device("cuda", local_rank=2)
    with pytest.raises(UserError, match=r"LOCAL_RANK is 3"):
        data.pick_device("auto", local_rank=3)
    with pytest.raises(UserError, match=r"--device cuda:2 asks for GPU 2, but this machine shows 2"):
        data.pick_device("cuda:2")


@pytest.mark.parametrize("capability, architectures, runs", [
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),      # an L4 on a build without sm_89: sm_86 code runs on 8.9
    ((6, 0), CURRENT_BUILD, False),                   # a P100 on current wheels
    ((7, 0), CURRENT_BUILD, False), ((6, 0), CUDA12_BUILD, True),
    ((6, 1), ["sm_60", "sm_70"], True),
    ((7, 0), ["sm_75", "sm_80"], False),              # sm_75 code does not run on 7.0
    ((8, 0), ["sm_90", "compute_80"], True),          # PTX for 8.0 is compiled by the driver
    ((7, 5), ["sm_90", "compute_80"], False),         # PTX runs only from its own capability on
    ((9, 0), ["sm_90a"], True), ((9, 1), ["sm_90a"], False),  # "a" code: that exact GPU only
    ((12, 0), ["sm_100", "sm_120"], True), ((10, 3), ["sm_100"], True), ((10, 0), ["sm_120"], False),
])
def test_which_builds_run_on_which_gpu(capability, architectures, runs):
    assert data.cuda_build_runs_on(capability, architectures) is runs


def test_a_gpu_the_build_has_no_kernels_for_is_refused_before_any_work(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, "Tesla P100-PCIE-16GB")
    result = run_script("train_cnn.py", "--device", "cuda", "--data-dir", tmp_path / "absent", cwd=tmp_path,
                        check=False)
    assert_user_error(result, "--device cuda: this PyTorch build has no GPU kernels for Tesla P100-PCIE-16GB "
                              "(compute capability 6.0; it carries sm_75", "use --device cpu")
    assert list(tmp_path.iterdir()) == []  # nothing read, nothing written
    with pytest.raises(UserError, match="--device auto picked cuda:0: this PyTorch build has no GPU kernels"):
        data.pick_device("auto")
    FakeCuda(monkeypatch, "NVIDIA L4", arch_list=["sm_80", "sm_86", "sm_90"])
    assert data.pick_device("cuda") == torch.device("cuda", 0)


def test_kfold_on_cuda_reaches_an_indexed_device(monkeypatch, tmp_path):
    """`make kfold DEVICE=cuda` once ended in set_device's ValueError; it now gets as far as the data."""
    gpus = FakeCuda(monkeypatch, "Tesla T4")
    (tmp_path / "train.csv").write_text("label,pixel0\n1,0\n")
    result = run_script("train_kfold.py", "--device", "cuda", "--train-csv", tmp_path / "train.csv",
                        "--archs", "vgg", "--folds", "0", "--out", tmp_path / "models", cwd=tmp_path, check=False)
    assert "Expected a torch.device" not in result.stderr and gpus.set_calls == [0]
    assert_user_error(result, "train.csv: missing column pixel1")  # the first thing after the device: the data


# ----------------------------------------------------------------------------- resume state across machines


def test_the_resume_state_holds_only_the_runs_own_gpu(monkeypatch):
    FakeCuda(monkeypatch, "Tesla T4", count=2)
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state,
                        device="cuda": restored.update({torch.device(device).index: state}))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was saved"))
    generators = train_cnn.make_generators(0, torch.device("cpu"))  # the generators' own states are the CPU's here
    saved = checkpoints.rng_state(generators, torch.device("cuda", 1))
    assert saved["device"] == "cuda" and torch.equal(saved["cuda"], states[1])
    # resumed on a machine with one GPU: the state goes to that GPU
    FakeCuda(monkeypatch, "Tesla T4", count=1)
    checkpoints.set_rng_state(generators, saved, torch.device("cuda", 0))
    assert list(restored) == [0] and torch.equal(restored[0], states[1])


def test_the_mps_generator_that_dropout_draws_from_is_saved_and_restored(monkeypatch):
    mps_state = torch.tensor([7, 7], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": mps_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": restored.append(state))
    generators = train_cnn.make_generators(0, torch.device("cpu"))
    saved = checkpoints.rng_state(generators, torch.device("mps"))
    assert saved["device"] == "mps" and torch.equal(saved["mps"], mps_state)
    checkpoints.set_rng_state(generators, saved, torch.device("mps"))
    assert len(restored) == 1 and torch.equal(restored[0], mps_state)


def test_a_resume_file_from_another_device_type_is_one_line(tmp_path):
    mnist = synthetic_mnist(tmp_path / "mnist", n_train=200, n_test=20)
    args = ["--data-dir", mnist, "--epochs", "2", "--batch-size", "32", "--precision", "fp32"]
    run_script("train_cnn.py", *args, cwd=tmp_path)
    # a run on a GPU that stopped after its first epoch leaves a resume file like this one
    checkpoint = checkpoints.load(tmp_path / "CNN_best_model.pth")
    state = {"model_state": checkpoint["model_state"], "optimizer_state": {}, "scheduler_state": {}, "scaler_state": {},
             "rng": {"device": "cuda", "cuda": torch.zeros(16, dtype=torch.uint8)}, "arch": "vgg",
             "progress": {"epoch": 1}, "settings": checkpoint["settings"]}
    checkpoints.save(tmp_path / "CNN_best_model.resume.pth", state)
    checkpoint["complete"] = False
    checkpoints.save(tmp_path / "CNN_best_model.pth", checkpoint)
    result = run_script("train_cnn.py", *args, cwd=tmp_path, check=False)
    assert_user_error(result, "CNN_best_model.resume.pth was written by a run on cuda, this run is on cpu",
                      "resume with --device cuda, or pass --retrain")


# ----------------------------------------------------------------------------- the same arithmetic as before


class AveragedModelReference:
    """The weight average as it was built on torch's AveragedModel, to check the device-side one against."""

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.averaged = AveragedModel(model, multi_avg_fn=self.lerp, use_buffers=True)
        self.module = self.averaged.module

    @torch.no_grad()
    def lerp(self, averaged, current, _):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    def update(self, model):
        self.averaged.update_parameters(model)
        self.updates += 1


def test_the_weight_average_equals_torchs_averaged_model_bit_for_bit():
    torch.manual_seed(0)
    model = build_model("resnet")
    ours, reference = train_cnn.EMA(model, 0.95), AveragedModelReference(model, 0.95)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in random_steps(model, optimizer, steps=12, batch_size=4):
        ours.update(model)
        reference.update(model)
    expected = reference.module.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in ours.module.state_dict().items())


def old_perspective_matrices(offsets, size=28):
    """perspective_matrices as it was, with its corners copied from the host and linalg.solve."""
    half = (size - 1) / 2
    corners = torch.tensor([[-half, -half], [half, -half], [half, half], [-half, half]], device=offsets.device)
    moved = corners - torch.sign(corners) * offsets * (size // 2)
    x, y = moved.unbind(-1)
    u, v = corners.expand_as(moved).unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    coefficients = torch.linalg.solve(torch.cat([rows_u, rows_v], 1), torch.cat([u, v], 1))
    return torch.cat([coefficients, one[:, :1]], 1).view(-1, 3, 3)


def test_augmentation_without_host_checks_gives_the_same_images_bit_for_bit(monkeypatch):
    offsets = torch.rand(64, 4, 2, generator=torch.Generator().manual_seed(1)) * 0.3
    assert torch.equal(augmentation.perspective_matrices(offsets, 28), old_perspective_matrices(offsets))
    images = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    ours = augmentation.augment(images, augmentation.strong_augmentation, torch.Generator().manual_seed(3))
    # the same draws through linalg.inv and linalg.solve, which check their result on the host
    monkeypatch.setattr(torch.linalg, "inv_ex", lambda a: types.SimpleNamespace(inverse=torch.linalg.inv(a)))
    monkeypatch.setattr(augmentation, "perspective_matrices", old_perspective_matrices)
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(ours, augmentation.augment(images, augmentation.strong_augmentation, generator))


def test_resnets_mean_pool_is_adaptive_average_pooling():
    model = build_model("resnet").eval()
    x = torch.randn(3, 256, 7, 7)
    assert torch.allclose(model.head[0](x), nn.AdaptiveAvgPool2d(1)(x), atol=1e-6)
    # finished checkpoints keep loading: the head's parameters keep their names
    assert [name for name, _ in model.head.named_parameters()] == ["3.weight", "3.bias"]


# ----------------------------------------------------------------------------- no host reads inside an epoch


class HostReadGuard:
    """Makes every host read of a tensor, and linalg's host-checked inverse and solve, raise when the project's own
    code calls it while a progress bar is open (that is, inside an epoch's or the TTA loop's batches)."""

    READS = [(torch.Tensor, "item"), (torch.Tensor, "__bool__"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
             (torch.Tensor, "numpy"), (torch.linalg, "inv"), (torch.linalg, "solve")]
    PROJECT = {str(ROOT / name) for name in ("data.py", "augmentation.py", "checkpoints.py", "train_cnn.py",
                                             "train_kfold.py", "predict_tta.py", "models.py")}

    def __init__(self, monkeypatch, also_watch=()):
        self.in_loop, self.batches = False, 0
        self.watched = self.PROJECT | set(also_watch)
        for owner, name in self.READS:
            monkeypatch.setattr(owner, name, self.guarded(getattr(owner, name), name))
        monkeypatch.setattr(data, "progress_bar", self.progress_bar)  # the bar of every epoch and TTA loop

    def guarded(self, original, name):
        def read(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.in_loop and caller in self.watched:
                raise AssertionError(f"{name} called from {caller} inside the batch loop: a host read")
            return original(*args, **kwargs)
        return read

    def progress_bar(self, total, description):
        guard = self

        class Bar:
            def __init__(self):
                guard.in_loop = True

            def update(self):
                guard.batches += 1

            def close(self):
                guard.in_loop = False
        return Bar()


def run_epoch(precision="fp32", augmentation="strong", seed=0):
    """One training epoch of a vgg with the EMA, on 96 synthetic images: ((loss, accuracy, finite), EMA weights,
    images)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(96) % 10
    model = train_cnn.new_model("vgg", torch.device("cpu"), seed)
    settings = {"batch_size": 16, "precision": precision, "augmentation": augmentation,
                "normalization": data.NORMALIZATION,
                "optimizer": "adam", "lr": 1e-3, "schedule": "warmup-cosine", "warmup_epochs": 0.3, "epochs": 1,
                "label_smoothing": 0.1, "ema_decay": 0.99}
    training = train_cnn.make_training(model, settings, train_cnn.steps_per_epoch(96, 16), seed)
    result = train_cnn.train_one_epoch(model, images, labels, training, settings)
    return result, training.ema.module.state_dict(), images


def test_an_epoch_and_the_tta_loop_make_no_host_reads_and_compute_what_they_did(monkeypatch):
    with monkeypatch.context() as before:  # the epoch as computed before: linalg's inverse and solve, AveragedModel
        before.setattr(torch.linalg, "inv_ex", lambda a: types.SimpleNamespace(inverse=torch.linalg.inv(a)))
        before.setattr(augmentation, "perspective_matrices", old_perspective_matrices)
        before.setattr(train_cnn, "EMA", AveragedModelReference)
        expected, expected_weights, _ = run_epoch()
    guard = HostReadGuard(monkeypatch)
    result, weights, images = run_epoch()
    assert guard.batches == 6 and not guard.in_loop
    assert result == expected  # the epoch's loss and accuracy, read once after the loop
    assert all(torch.equal(tensor, expected_weights[name]) for name, tensor in weights.items())
    run_epoch(precision="fp16", augmentation="light")  # the gradient scaler's step: fused, on the device

    # validation, and the TTA loop of a two-model ensemble over every variant
    models = [(train_cnn.new_model(arch, torch.device("cpu"), 0).eval(), data.NORMALIZATION,
               arch) for arch in ("vgg", "widecnn")]
    guard.in_loop = True
    logits = train_cnn.predict_logits(models[0][0], images, data.NORMALIZATION, "fp32")
    guard.in_loop = False
    probs = predict_tta.ensemble_probabilities(models, images, augmentation.TTA_VARIANTS, "fp32", seed=0, batch_size=32)
    assert guard.batches == 6 + 6 + 3 and logits.shape == (96, 10) and probs.shape == (96, 10)
    assert torch.allclose(probs.sum(1), torch.ones(96), atol=1e-5)


def test_the_guard_catches_a_host_read_in_the_loop(monkeypatch):
    """The guard above is not vacuous: a read put into the batch loop fails it (here from this file, watched too)."""
    HostReadGuard(monkeypatch, also_watch=[__file__])
    prepare = data.prepare_batch

    def prepare_and_read(images, *args):
        bool(images.sum() > 0)
        return prepare(images, *args)
    monkeypatch.setattr(data, "prepare_batch", prepare_and_read)
    with pytest.raises(AssertionError, match="__bool__ called from .*test_gpu_paths.py inside the batch loop"):
        run_epoch()


# ----------------------------------------------------------------------------- make gpu-check, run here on the CPU


def test_the_gpu_check_runs_every_stage_and_reports_each(tmp_path, mnist_dir):
    out = tmp_path / "check"
    # the check's own time limit is a GPU session's; a slow CPU beside another test process may need more
    result = subprocess.run([sys.executable, ROOT / "tools" / "gpu_check.py", "--device", "cpu", "--limit", "120",
                             "--time-limit", "600", "--data-dir", mnist_dir, "--out", out],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {out / 'gpu_check.json'}: 8 of 8 stages ok"
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["device", "bench", "sync", "pipeline_a", "pipeline_b", "torchrun", "deterministic",
                            "resume"]
    assert all(stage["ok"] and stage["seconds"] >= 0 for stage in stages.values()), stages
    assert stages["device"]["device"] == "cpu" and stages["device"]["precision_auto"] in ("bf16", "fp32")
    assert stages["device"]["torch"] == str(torch.__version__)
    assert all(stages["bench"][arch]["ours"] > 0 and stages["bench"][arch]["ceiling"] > 0 for arch in ("vgg", "resnet",
                                                                                                       "widecnn"))
    sync = stages["sync"]
    assert sync["sync_debug_mode"] is False and sync["sync_warnings"] == 0 and sync["tta_sync_warnings"] == 0
    assert "epoch_fp16_sync_warnings" in sync and sync["sync_messages"] == []
    assert stages["pipeline_a"]["fp16"]["precision"] == "fp16"
    assert all(0 <= stages["pipeline_a"][p]["test_accuracy"] <= 1 for p in ("auto", "fp16"))
    assert set(stages["pipeline_b"]["val_accuracy"]) == {"resnet", "widecnn"}
    assert 0 <= stages["pipeline_b"]["tta_test_accuracy"] <= 1
    device_line = stages["torchrun"]["device_line"]
    assert device_line.startswith("device cpu") and "jobs vgg/0" in device_line
    assert stages["deterministic"]["bit_for_bit"] is True
    assert stages["resume"] == {**stages["resume"], "killed_after_epoch": 1, "resumed": True,
                                "matches_uninterrupted": True}
    log = (out / "gpu_check.log").read_text()
    # every command in the log: pipeline A 2, pipeline B 2, torchrun 1, deterministic 2, the killed run and its resume
    assert log.count("$ ") == 9 and "resuming resumed.pth after epoch 1" in log


def test_the_gpu_check_counts_cudas_sync_warnings_and_not_its_notice_on_turning_them_on():
    import gpu_check

    def run():  # what torch.cuda.set_sync_debug_mode("warn") and a .item() inside a batch loop print on a GPU
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                      "operations (Triggered internally at /pytorch/torch/csrc/cuda/Module.cpp:1003.)", stacklevel=1)
        warnings.warn("called a synchronizing CUDA operation (Triggered internally at "
                      "/pytorch/c10/cuda/CUDAFunctions.cpp:154.)", stacklevel=1)
    counter = gpu_check.SyncCounter(torch.device("cpu"))
    assert counter.count(run) == 1
    assert len(counter.messages) == 1 and "called a synchronizing CUDA operation" in counter.messages[0]


def test_a_gpu_check_cut_short_still_reports_every_stage(tmp_path, mnist_dir):
    result = subprocess.run([sys.executable, ROOT / "tools" / "gpu_check.py", "--device", "cpu", "--time-limit", "0",
                             "--data-dir", mnist_dir, "--out", tmp_path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert len(stages) == 8 and all(s == {"ok": False,
                                          "error": "not run: the time limit was reached"} for s in stages.values())
