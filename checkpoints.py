"""Checkpoints: the one file format every script reads and writes, every file kept beside a checkpoint, and the run
files that keep a training run safe and exact.

The format: a dict of plain types and tensors, so that torch.load(weights_only=True) reads it and a downloaded file
cannot run code.
    model_state    the model's plain state_dict (the EMA weights when the EMA is on)
    arch           a name in models.MODELS, or models.LINE_READER for a line reader (train_reader.py)
    normalization  {"mean": float, "std": float}: what the model's inputs were standardized with
    epoch          the epoch these weights are from
    precision, metrics {"val_loss", "val_accuracy"}, settings (what defines the run), versions
    complete       True once the run that writes it has finished
    trained_on     optional: the record of the images the model trained on (see image_hashes); older files lack it
    line_reader    optional: the state_dict of a models.LineReader, for --number (the released model has one)

Beside NAME.pth (their names in one place, below): NAME.history.json (one record per epoch), and while training runs,
NAME.resume.pth (the exact state to resume from), NAME.lock (held for the run's life) and, for a --budget run,
NAME.plan.json; a k-fold job adds ARCH_foldK.oof.npz. In this file: the format (save, read, check, the released
model and its SHA-256, a model from a checkpoint, the record of training images), the files beside a checkpoint,
then the run files only training writes (the lock, the settings check, exact resume with the random state).
"""
import contextlib
import hashlib
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cli import UserError, atomic_path, brief, quoted, read_json, same_file, write_json
from data import NUM_PIXELS, place_model
from models import LINE_READER, MODELS, LineReader, build_model

# ----------------------------------------------------------------------------- the checkpoint format

CHECKPOINT_KEYS = ("model_state", "arch", "normalization", "epoch")
PIPELINE_A_CHECKPOINT = "CNN_best_model.pth"  # train_cnn.py's checkpoint, and what prediction uses when it is here
# The released model and its manifest (SHA-256, command, commit, machine, accuracy), beside the scripts (not in the
# working directory), so a copy of the repository reads with it from anywhere.
RELEASED_MODEL = Path(__file__).resolve().parent / "weights" / "vgg_mnist.pth"
RELEASE_MANIFEST = RELEASED_MODEL.with_name("manifest.json")


def save(path, checkpoint):
    """Write a checkpoint dict (plain types and tensors only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)

def read(path, required):
    """torch.load(weights_only=True) of a dict that must hold the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    if same_file(path, RELEASED_MODEL):
        check_release_digest(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, pickle with code in it, truncated file, ...
        # weights_only refusals bury the reason (the blocked global it would import) in a long message
        reason = brief(error, lambda lines: next((line for line in lines if "global" in line.lower()), lines[0]))
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not set(required) <= set(checkpoint):
        raise UserError(f"{path}: not a checkpoint of this project (it needs {', '.join(required)})")
    return checkpoint

def check_release_digest(path):
    """The released model is byte for byte the file its manifest names: a changed or truncated copy is one line."""
    manifest = read_json(RELEASE_MANIFEST)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != manifest.get("sha256"):
        raise UserError(f"{path}: its SHA-256 is not the one in {RELEASE_MANIFEST.name} (the file was changed or cut "
                        "short); restore it with `git checkout -- weights/`, or copy weights/ again from the "
                        "repository")

def load(path):
    """A model checkpoint, read safely and checked field by field."""
    checkpoint = read(path, CHECKPOINT_KEYS)
    check_checkpoint_fields(path, checkpoint)
    return checkpoint

def check_checkpoint_fields(path, checkpoint):
    """Each field of the format has the type and range it must have; the weights are finite."""
    arch, normalization, epoch = checkpoint["arch"], checkpoint["normalization"], checkpoint["epoch"]
    if not isinstance(arch, str) or arch not in (*MODELS, LINE_READER):
        raise UserError(f"{path}: unknown architecture {quoted(arch)} (known: {', '.join((*MODELS, LINE_READER))})")
    if not (isinstance(normalization, dict) and set(normalization) == {"mean", "std"}
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in normalization.values())
            and normalization["std"] > 0):
        raise UserError(f"{path}: normalization must be {{'mean': number, 'std': positive number}}, "
                        f"found {quoted(normalization)}")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise UserError(f"{path}: epoch must be a whole number, found {quoted(epoch)}")
    check_state_dict(path, checkpoint["model_state"])
    if "line_reader" in checkpoint:
        check_state_dict(path, checkpoint["line_reader"])
    record = checkpoint.get("trained_on")
    if record is not None and not (torch.is_tensor(record) and record.dtype == torch.int64 and record.dim() == 1
                                   and bool((record[1:] > record[:-1]).all())):
        raise UserError(f"{path}: trained_on must be a sorted int64 tensor of image hashes, found {quoted(record)}")

def check_state_dict(path, state):
    """A state dict: names -> tensors, every floating-point value finite (a NaN model labels every image 0)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path}: model_state is not a dict of named tensors (found {type(state).__name__})")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: the weights are not finite ({name} holds NaN or Inf); train it again")

def is_complete(checkpoint):
    """True when the run that wrote this checkpoint dict finished (its weights are the run's best)."""
    return checkpoint.get("complete", False) is True

def load_model(path, device, checkpoint=None):
    """Build the checkpoint's architecture and load its weights: (model in eval mode, checkpoint dict)."""
    checkpoint = checkpoint or load(path)
    arch = checkpoint["arch"]
    if arch not in MODELS:
        raise UserError(f"{path}: a line reader (train_reader.py), not a digit classifier; give it as --reader")
    model = build_model(arch)
    try:
        model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as error:
        reason = brief(error, lambda lines: lines[1 if len(lines) > 1 else 0])  # the first says which class failed
        raise UserError(f"{path}: weights do not fit the {arch} architecture ({reason})") from None
    return place_model(model, device).eval(), checkpoint


def load_line_reader(path, device, checkpoint):
    """The models.LineReader in eval mode that a checkpoint is (train_reader.py's) or carries (the released model's),
    or None when it has none."""
    state = checkpoint["model_state"] if checkpoint["arch"] == LINE_READER else checkpoint.get("line_reader")
    if state is None:
        return None
    reader = LineReader()
    try:
        reader.load_state_dict(state)
    except RuntimeError as error:
        raise UserError(f"{path}: its line reader does not fit models.LineReader "
                        f"({brief(error, lambda lines: lines[1 if len(lines) > 1 else 0])})") from None
    return reader.to(device).eval()


def image_hashes(images):
    """A 64-bit content hash of each image's 784 bytes (blake2b), as int64 [N]: the same image hashes the same
    wherever it comes from (MNIST's IDX files, a Kaggle CSV, a photo's 28x28 input), in any order."""
    rows = images.reshape(len(images), NUM_PIXELS).to("cpu", torch.uint8).numpy()
    digests = b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rows)
    return torch.from_numpy(np.frombuffer(digests, dtype="<i8").copy())

def trained_on_mask(hashes, records):
    """For image hashes [N] and one record per model (None: a checkpoint without one): bool [models, N]."""
    rows = [torch.zeros(len(hashes), dtype=torch.bool) if r is None else torch.isin(hashes, r) for r in records]
    return torch.stack(rows) if rows else torch.zeros(0, len(hashes), dtype=torch.bool)


def checkpoint_files(paths):
    """The checkpoint files that paths name: files as given, folders expanded to their *.pth (resume files left out)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p in sorted(path.glob("*.pth")) if not p.name.endswith(RESUME_SUFFIX)]
        else:
            files.append(path)
    return files



def library_versions():
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__)}


# ----------------------------------------------------------------------------- the files beside a checkpoint

RESUME_SUFFIX = ".resume.pth"


def history_path(checkpoint):
    """One record per epoch, kept with the finished model (evaluate.py draws its curves from it)."""
    return Path(checkpoint).with_suffix(".history.json")


def resume_path(checkpoint):
    """Per-epoch training state beside the best checkpoint; removed once training completes."""
    return Path(checkpoint).with_suffix(RESUME_SUFFIX)


def lock_path(checkpoint):
    """The lock a training run holds on its checkpoint; the file stays, the lock ends with the process."""
    return Path(checkpoint).with_suffix(".lock")


def plan_path(checkpoint):
    """A --budget run's plan (train_cnn.py's budget planner): its number of steps, kept for a resume or a rerun."""
    return Path(checkpoint).with_suffix(".plan.json")


def job_checkpoint(out, arch, fold):
    """The checkpoint of train_kfold.py's (arch, fold) job in its --out folder."""
    return Path(out) / f"{arch}_fold{fold}.pth"


def oof_path(out, arch, fold):
    """An (arch, fold) job's out-of-fold probabilities."""
    return Path(out) / f"{arch}_fold{fold}.oof.npz"


def training_files(checkpoint):
    """Every file a training run writes for this checkpoint, the lock aside (it holds no data)."""
    return [Path(checkpoint), history_path(checkpoint), resume_path(checkpoint), plan_path(checkpoint)]


def job_files(out, arch, fold):
    """Every file an (arch, fold) job writes."""
    return [*training_files(job_checkpoint(out, arch, fold)), oof_path(out, arch, fold)]


# ============================================================================= run files
# Below: what only training writes, and what keeps a run safe and exact: the run and its settings, the lock on a
# checkpoint, the data fingerprint and the record of training images, the settings check, finishing a checkpoint,
# and the resume state with its random generators.

@dataclass
class Run:
    """One training run: its checkpoint, its settings and which of them are flags, the model's seed, its log."""
    checkpoint: Path
    settings: dict
    flags: frozenset  # the settings given on the command line, named --flag in messages
    seed: int
    retrain: bool = False
    log: Callable[[str], None] = print
    # Settings added after checkpoints were first written: a file without one was made with this value (or, for
    # a function, the value it gives for the file's other settings), so finished models stay valid.
    added_settings: dict = field(default_factory=dict)


RESUME_KEYS = ("model_state", "optimizer_state", "scheduler_state", "scaler_state", "rng", "progress", "arch")


@contextlib.contextmanager
def checkpoint_lock(checkpoint):
    """Hold the checkpoint's lock for a run's life; a UserError when another run holds it.

    An advisory lock on a file beside the checkpoint (filelock, flock on POSIX): the system releases it
    when the process ends, however it ends, so a killed run never leaves a stale lock behind.
    """
    from filelock import FileLock, Timeout
    path = lock_path(checkpoint)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{checkpoint} is in use by another training run (it holds {path}); "
                        "wait for it to finish, or choose another checkpoint or output folder") from None
    except OSError as error:
        raise UserError(f"cannot lock {path}: {error.strerror or error}") from None
    try:
        yield
    finally:
        lock.release()


def data_fingerprint(images, labels):
    """A short description of a training set that changes when any image or label does."""
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return f"{len(labels)} images, sha256 {digest.hexdigest()[:16]}"


def training_record(images):
    """What a checkpoint's trained_on holds: the sorted, distinct hashes (image_hashes) of the images its model
    trained on, the validation images not counted."""
    return torch.unique(image_hashes(images))



def settings_difference(saved, current, may_change, added_settings):
    """(name, saved value, current value) of the first setting that differs outside may_change, else None.

    First in the order of `current` (the order the run defines them in), then settings only `saved` has.
    A setting in added_settings that `saved` lacks is read as the value runs had before it existed.
    """
    added = {name: value(saved) if callable(value) else value
             for name, value in added_settings.items() if name in current and name not in saved}
    saved = {**saved, **added}
    for name in [*current, *(name for name in saved if name not in current)]:
        if name not in may_change and saved.get(name) != current.get(name):
            return name, saved.get(name), current.get(name)
    return None


def check_same_run(path, saved_settings, run, resuming):
    """A checkpoint or resume file belongs to a run with these settings; one line naming the first that differs.

    Allowed to differ: --patience, and --epochs under the step schedule (whose rates do not depend on it);
    a finished run may also be used at another --precision.
    """
    if not isinstance(saved_settings, dict):
        raise UserError(f"{path} records no run settings, so it cannot be checked against this run; "
                        "pass --retrain to train it again")
    may_change = {"patience"} | ({"epochs"} if run.settings["schedule"] == "step" else set())
    if not resuming:
        may_change.add("precision")
    difference = settings_difference(saved_settings, run.settings, may_change, run.added_settings)
    if difference:
        name, before, now = difference
        name = f"--{name.replace('_', '-')}" if name in run.flags else name
        raise UserError(f"{path} was trained with {name} {quoted(before)}, this run has {quoted(now)}: "
                        "repeat the original settings, or pass --retrain to start again")


def existing_checkpoint(path, retrain):
    """The contents of a run's checkpoint file, read and checked; None when there is none or under --retrain."""
    path = Path(path)
    return load(path) if path.exists() and not retrain else None


def finished_checkpoint(run, existing):
    """`existing` (the checkpoint file's contents, or None) when it is this run's finished model, else None (train);
    one line when it is the finished model of other settings."""
    if existing is None or not is_complete(existing):
        return None
    check_same_run(run.checkpoint, existing.get("settings"), run, resuming=False)
    return existing


def checkpoint_dict(model, record, settings, trained_on):
    """A checkpoint of `model`'s weights after the epoch `record` (a history entry) describes.

    trained_on: the record of the training images (training_record), validation images not counted.
    """
    return {"model_state": model.state_dict(), "arch": settings["arch"],
            "normalization": dict(settings["normalization"]),
            "precision": settings["precision"], "epoch": record["epoch"],
            "metrics": {"val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]},
            "settings": settings, "versions": library_versions(), "complete": False, "trained_on": trained_on}


def mark_complete(path):
    """Mark the checkpoint at `path` as the finished run's best; returns the checkpoint dict."""
    checkpoint = load(path)
    checkpoint["complete"] = True
    save(path, checkpoint)
    return checkpoint


def save_epoch(run, model, training, progress):
    """After an epoch: the resume file (everything an exact replay needs) and the history JSON."""
    device = next(model.parameters()).device
    state = {"model_state": model.state_dict(), "optimizer_state": training.optimizer.state_dict(),
             "scheduler_state": training.scheduler.state_dict(), "scaler_state": training.scaler.state_dict(),
             "rng": rng_state(training.generators, device), "progress": progress, "arch": run.settings["arch"],
             "settings": run.settings, "average": None if training.ema is None else training.ema.state_dict()}
    save(resume_path(run.checkpoint), state)
    write_json(history_path(run.checkpoint), progress["history"])


def restore_run(run, model, training):
    """The progress of a new run, or of the run the resume file holds, restored into model and training.

    A resume file of another run (architecture, settings, device type) is one line, before anything is loaded.
    """
    resume = resume_path(run.checkpoint)
    if run.retrain:  # --retrain starts again, whatever an earlier run left
        resume.unlink(missing_ok=True)
    if not resume.exists():
        return {"epoch": 0, "best": None, "best_epoch": None, "stale_epochs": 0, "history": []}
    device = next(model.parameters()).device
    saved = read(resume, RESUME_KEYS)
    if saved["arch"] != run.settings["arch"]:
        raise UserError(f"{resume}: the resume file of a {quoted(saved['arch'])} run, not {run.settings['arch']}; "
                        "pass --retrain to start again, or another --checkpoint")
    check_same_run(resume, saved.get("settings"), run, resuming=True)
    check_resume_device(resume, saved["rng"], device)
    check_state_dict(resume, saved["model_state"])
    model.load_state_dict(saved["model_state"])
    training.optimizer.load_state_dict(saved["optimizer_state"])
    training.scheduler.load_state_dict(saved["scheduler_state"])
    training.scaler.load_state_dict(saved["scaler_state"])
    if training.ema is not None:
        training.ema.load_state_dict(saved["average"])
    set_rng_state(training.generators, saved["rng"], device)
    run.log(f"resuming {run.checkpoint} after epoch {saved['progress']['epoch']} from {resume}")
    return saved["progress"]


def rng_state(generators, device):
    """The random state a resumed run needs: its generators, and the one dropout draws from on its device.

    Only the run's own device is saved (not every visible GPU), so a run resumes on a machine with fewer GPUs.
    """
    state = {name: g.get_state() for name, g in generators.items()}
    state["device"] = device.type
    state["torch"] = torch.get_rng_state()  # dropout on the CPU draws from the global generator
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def check_resume_device(path, state, device):
    """A resume file carries generator states of its device type, which no other type can take; one line if so."""
    saved = state.get("device", "cpu")  # resume files that name no device were written on a CPU
    if saved != device.type:
        raise UserError(f"{path} was written by a run on {saved}, this run is on {device.type}: random generator "
                        "states "
                        f"do not carry across device types; resume with --device {saved}, or pass --retrain to start "
                        "again")


def set_rng_state(generators, state, device):
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["mps"])

