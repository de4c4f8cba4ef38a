"""Pipeline A: train the VGG-style CNN on MNIST (or a Kaggle train.csv) and report test accuracy.

    python train_cnn.py --data-dir ../shared/data          # train, or reuse CNN_best_model.pth if it exists
    python train_cnn.py --epochs 3 --limit 2000 --retrain   # a quick smoke run

The epoch, validation and fit functions below are shared with train_kfold.py. The training loop keeps
the whole data set on the device and never waits for it inside an epoch: metrics accumulate there and
are read once per epoch. An interrupted run resumes from its last epoch when the command is repeated.
"""
import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from data import (
    AUGMENTATIONS,
    EVAL_BATCH_SIZE,
    NORMALIZATION,
    UserError,
    add_data_arguments,
    add_device_arguments,
    autocast,
    batch_indices,
    check_outputs,
    checkpoint_dict,
    checkpoint_lock,
    data_fingerprint,
    fraction,
    history_path,
    is_complete,
    load_checkpoint,
    load_data,
    load_mnist,
    load_resume_state,
    mark_complete,
    model_from_checkpoint,
    new_model,
    nonnegative_float,
    pick_device,
    pick_precision,
    positive_float,
    positive_int,
    prepare_batch,
    progress_bar,
    quoted,
    resolve_data_arguments,
    resume_path,
    run_cli,
    save_checkpoint,
    save_resume_state,
    seed_int,
    settings_difference,
    stratified_split,
    to_device,
    use_deterministic_algorithms,
    write_json,
)

# Each schedule and the settings it reads besides --lr and --epochs (see lr_factor).
SCHEDULE_SETTINGS = {"step": ("lr_step", "lr_gamma"), "cosine": (), "warmup-cosine": ("warmup_epochs",)}
# Settings named after their command-line flag (the others: arch, data, split, monitor, normalization).
FLAG_SETTINGS = {"seed", "optimizer", "lr", "weight_decay", "schedule", "lr_step", "lr_gamma", "warmup_epochs", "epochs",
                 "batch_size", "label_smoothing", "augmentation", "precision", "ema_decay", "patience"}


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, images, labels, optimizer, scheduler, criterion, scaler, settings, generators, average):
    """One pass over images (uint8 [N, 28, 28] on the device) in shuffled batches: (mean loss, accuracy, finite).

    The learning rate moves every step; `average` (or None) follows the weights. finite is False when a
    loss was NaN or Inf: a flag kept on the device, read once with the epoch's metrics.
    """
    model.train()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)
    seen = 0
    augmentation = AUGMENTATIONS[settings["augmentation"]]
    batches = batch_indices(len(images), settings["batch_size"], generators["shuffle"])
    progress = progress_bar(len(batches), "train")
    for index in batches:
        if len(index) < 2:  # BatchNorm cannot train on a single image
            continue
        x = prepare_batch(images[index], settings["normalization"], augmentation, generators["augment"])  # [B, 1, 28, 28]
        y = labels[index]
        with autocast(device, settings["precision"]):
            logits = model(x)                                                      # [B, 10]
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if average is not None:
            average.update(model)
        finite &= torch.isfinite(loss.detach())
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(1) == y).sum()
        seen += len(index)
        progress.update()
    progress.close()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), bool(finite)


@torch.inference_mode()
def predict_logits(model, images, normalization, precision):
    """Logits [N, 10] (float32) for uint8 images [N, 28, 28] on the model's device, in eval mode."""
    model.eval()
    outputs = []
    for index in batch_indices(len(images), EVAL_BATCH_SIZE):
        x = prepare_batch(images[index], normalization)
        with autocast(images.device, precision):
            outputs.append(model(x).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=images.device)


def loss_and_accuracy(model, images, labels, criterion, normalization, precision):
    """(mean loss, accuracy) of the model on a labelled set, without augmentation."""
    logits = predict_logits(model, images, normalization, precision)
    loss = criterion(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- optimizer, schedule, weight averaging

def make_optimizer(model, settings):
    """Adam or AdamW; fused on a GPU and wherever a gradient scaler runs (fp16).

    The fused step reads the scaler's scale and its inf check on the device; with the plain step, GradScaler
    reads them on the host every step, which waits for the GPU.
    """
    device = next(model.parameters()).device
    fused = device.type == "cuda" or settings["precision"] == "fp16"
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings["lr"], fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"], fused=fused)


def steps_per_epoch(n, batch_size):
    """Optimizer steps in one epoch of n images (a last batch of one image is skipped, see train_one_epoch)."""
    return n // batch_size + (n % batch_size > 1)


def lr_factor(step, steps, settings):
    """The learning rate at optimizer step `step` (from 0), as a fraction of settings['lr'].

    step:          x gamma every lr_step epochs (torch's StepLR, pipeline A's protocol)
    cosine:        cosine from 1 towards 0, one value per epoch (CosineAnnealingLR over the epochs, pipeline B's)
    warmup-cosine: linear from 0 to 1 over warmup_epochs, then cosine to 0 at the last step, every step
    """
    epoch = step // steps
    if settings["schedule"] == "step":
        return settings["lr_gamma"] ** (epoch // settings["lr_step"])
    if settings["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / settings["epochs"]))
    total = steps * settings["epochs"]
    warmup = min(round(settings["warmup_epochs"] * steps), total - 1)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def make_schedule(optimizer, settings, steps):
    """A LambdaLR stepped after every optimizer step; `steps` per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, settings))


class WeightAverage:
    """An exponential moving average of the weights and BatchNorm statistics, updated after every step.

    The first update copies the weights; after that the decay warms up as (1 + t) / (10 + t) until it reaches
    `decay`, so the first steps (random weights) fade quickly and a short run averages over its last tenth
    instead of carrying its start. The average is a copy of the model on its device, moved with one foreach
    lerp per step and a step count kept on the host: nothing waits for a GPU (torch's AveragedModel keeps its
    count in a tensor and reads it back on every update).
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        averaged, current = model_tensors(self.module), model_tensors(model)
        if self.updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
            floating = [i for i, t in enumerate(averaged) if t.is_floating_point()]
            counts = [i for i, t in enumerate(averaged) if not t.is_floating_point()]  # BatchNorm's num_batches_tracked
            torch._foreach_lerp_([averaged[i] for i in floating], [current[i] for i in floating], 1 - decay)
            torch._foreach_copy_([averaged[i] for i in counts], [current[i] for i in counts])
        self.updates += 1

    def state_dict(self):
        return {"model_state": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["model_state"])
        self.updates = state["updates"]


def model_tensors(model):
    """The parameters and buffers of a model, in a fixed order."""
    return [t.detach() for t in (*model.parameters(), *model.buffers())]


# ----------------------------------------------------------------------------- fit: epochs, early stopping, files

def make_generators(seed, device):
    """One generator per purpose, so a resumed run replays exactly the shuffling and augmentation it would have."""
    return {"shuffle": torch.Generator(device).manual_seed(seed + 1),
            "augment": torch.Generator(device).manual_seed(seed + 2)}


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
    saved = state.get("device", "cpu")  # resume files that record no device were written by CPU runs
    if saved != device.type:
        raise UserError(f"{path} was written by a run on {saved}, this run is on {device.type}: random generator states "
                        f"do not carry across device types; resume with --device {saved}, or pass --retrain to start again")


def set_rng_state(generators, state, device):
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def is_better(value, best, monitor):
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def check_same_run(path, saved_settings, settings, log, resuming):
    """A checkpoint or resume file belongs to a run with these settings; one line naming the first that differs.

    Allowed to differ: --patience, and --epochs under the step schedule (whose rates do not depend on it);
    a finished run may also be used at another --precision.
    """
    if saved_settings is None:
        log(f"note: {path} records no run settings (written before they were kept); using it as it is")
        return
    may_change = {"patience"} | ({"epochs"} if settings["schedule"] == "step" else set())
    if not resuming:
        may_change.add("precision")
    difference = settings_difference(saved_settings, settings, may_change)
    if difference:
        name, before, now = difference
        name = f"--{name.replace('_', '-')}" if name in FLAG_SETTINGS else name
        raise UserError(f"{path} was trained with {name} {quoted(before)}, this run has {quoted(now)}: "
                        "repeat the original settings, or pass --retrain to start again")


def fit(model, train_set, val_set, settings, checkpoint_path, seed, log=print):
    """Train until settings['epochs'] or early stopping; the best epoch by settings['monitor'] is kept.

    Files: the best checkpoint (rewritten on each improvement, marked complete at the end), the
    history JSON, and a resume file written every epoch, so a killed run loses at most one epoch.
    With weight averaging (settings['ema_decay'] > 0) the averaged weights are validated and saved.
    Returns the history (one dict per epoch) and leaves the best weights loaded in `model`.
    """
    device = train_set[0].device
    criterion = nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"])
    scaler = torch.amp.GradScaler(device.type, enabled=settings["precision"] == "fp16")
    optimizer = make_optimizer(model, settings)
    scheduler = make_schedule(optimizer, settings, steps_per_epoch(len(train_set[0]), settings["batch_size"]))
    average = WeightAverage(model, settings["ema_decay"]) if settings["ema_decay"] > 0 else None
    generators = make_generators(seed, device)
    state = {"epoch": 0, "best": None, "best_epoch": None, "stale_epochs": 0, "history": []}
    resume = resume_path(checkpoint_path)
    if resume.exists():
        saved = load_resume_state(resume, settings["arch"])
        if saved.get("settings") is None:
            raise UserError(f"{resume} was written by an earlier version of this project; pass --retrain to start again")
        check_same_run(resume, saved["settings"], settings, log, resuming=True)
        check_resume_device(resume, saved["rng"], device)
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        scheduler.load_state_dict(saved["scheduler_state"])
        scaler.load_state_dict(saved["scaler_state"])
        if average is not None:
            average.load_state_dict(saved["average"])
        set_rng_state(generators, saved["rng"], device)
        state = saved["progress"]
        log(f"resuming {checkpoint_path} after epoch {state['epoch']} from {resume}")

    evaluated = model if average is None else average.module
    monitor, patience = settings["monitor"], settings["patience"]
    while state["epoch"] < settings["epochs"] and state["stale_epochs"] < patience:
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc, finite = train_one_epoch(model, *train_set, optimizer, scheduler, criterion, scaler,
                                                        settings, generators, average)
        if not finite or not all_finite(model):
            raise UserError(f"training diverged in epoch {state['epoch'] + 1}: the loss or the weights became NaN or Inf "
                            f"(try a lower --lr); {checkpoint_path} is not marked complete")
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = loss_and_accuracy(evaluated, *val_set, criterion, settings["normalization"], settings["precision"])
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": train_loss, "train_accuracy": train_acc,
                  "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                  "seconds": time.perf_counter() - start, "images_per_second": len(train_set[0]) / train_seconds}
        if average is not None:  # what the averaging gains: the same epoch's plain weights
            record["raw_val_loss"], record["raw_val_accuracy"] = loss_and_accuracy(
                model, *val_set, criterion, settings["normalization"], settings["precision"])
        state["history"].append(record)
        value = record[monitor]
        if is_better(value, state["best"], monitor):
            state.update(best=value, best_epoch=state["epoch"], stale_epochs=0)
            save_checkpoint(checkpoint_path, checkpoint_dict(evaluated, record, settings))
        else:
            state["stale_epochs"] += 1
        save_resume_state(resume, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                          scheduler_state=scheduler.state_dict(), scaler_state=scaler.state_dict(),
                          rng=rng_state(generators, device), progress=state, arch=settings["arch"], settings=settings,
                          average=None if average is None else average.state_dict())
        write_json(history_path(checkpoint_path), state["history"])
        raw = f"  (plain weights {record['raw_val_accuracy']:.4f})" if average is not None else ""
        log(f"epoch {state['epoch']:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}{raw}  lr {lr:.2e}  {record['seconds']:.1f}s  "
            f"{record['images_per_second']:.0f} img/s" + ("  *" if state["best_epoch"] == state["epoch"] else ""))
    if state["stale_epochs"] >= patience:
        log(f"early stop: {monitor} did not improve for {patience} epochs")

    # Mark the best checkpoint complete, then drop the resume file: a run is finished only when both are done.
    best = mark_complete(checkpoint_path)
    resume.unlink(missing_ok=True)
    model.load_state_dict(best["model_state"])
    log(f"best epoch {state['best_epoch']} ({monitor} {state['best']:.4f}) saved to {checkpoint_path}")
    return state["history"]


def all_finite(model):
    """True when every parameter and buffer is finite (read once per epoch)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def add_training_arguments(p, epochs, optimizer, schedule, patience, augmentation, monitor_help):
    """The optimization flags pipelines A and B share; each passes its own protocol's defaults."""
    p.add_argument("--epochs", type=positive_int, default=epochs, help="epoch budget (the schedule's length)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", choices=["adam", "adamw"], default=optimizer)
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-4, help="AdamW's decoupled weight decay (not used by adam)")
    p.add_argument("--schedule", choices=SCHEDULE_SETTINGS, default=schedule,
                   help="step: x --lr-gamma every --lr-step epochs; cosine: cosine to 0 by epoch; "
                        "warmup-cosine: linear warm-up over --warmup-epochs, then cosine to 0, every step")
    p.add_argument("--lr-step", type=positive_int, default=10, help="step schedule: epochs between learning-rate cuts")
    p.add_argument("--lr-gamma", type=positive_float, default=0.5, help="step schedule: factor at each cut")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.3, help="warmup-cosine schedule: warm-up length in epochs")
    p.add_argument("--ema-decay", type=ema_decay, default=0.999,
                   help="weight averaging: the EMA's decay per step (warmed up from 0.1); 0 turns it off")
    p.add_argument("--label-smoothing", type=label_smoothing, default=0.1)
    p.add_argument("--patience", type=positive_int, default=patience, help=f"early stop after this many epochs without {monitor_help}")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default=augmentation)
    p.add_argument("--seed", type=seed_int, default=42)
    p.add_argument("--use-deterministic-algorithms", action="store_true",
                   help="repeat bit for bit on a GPU as well as on a CPU, somewhat slower (see README, GPUs and Macs)")


def ema_decay(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or in (0, 1), got {text}")
    return value


def label_smoothing(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def training_settings(args, arch, precision, monitor, fingerprint, split):
    """Everything that defines a training run, as plain values: the loop reads it, checkpoints record it.

    Flags that do not act in this run (weight decay for adam, another schedule's parameters) are left out,
    so changing them does not count as another run.
    """
    settings = {"arch": arch, "data": fingerprint, "split": split, "seed": args.seed, "optimizer": args.optimizer,
                "lr": args.lr, "schedule": args.schedule, "epochs": args.epochs, "batch_size": args.batch_size,
                "label_smoothing": args.label_smoothing, "augmentation": args.augmentation, "precision": precision,
                "ema_decay": args.ema_decay, "monitor": monitor, "patience": args.patience,
                "normalization": dict(NORMALIZATION)}
    if args.optimizer == "adamw":
        settings["weight_decay"] = args.weight_decay
    settings.update({name: getattr(args, name) for name in SCHEDULE_SETTINGS[args.schedule]})
    return settings


# ----------------------------------------------------------------------------- pipeline A's command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(p, default="mnist", split="train")
    p.add_argument("--checkpoint", default="CNN_best_model.pth", help="best-model file; reused if complete")
    p.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    add_training_arguments(p, epochs=50, optimizer="adam", schedule="step", patience=5, augmentation="light",
                           monitor_help="a lower validation loss")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="stratified validation share of the training set")
    p.add_argument("--limit", type=positive_int, help="use only the first N training and N test images (smoke runs)")
    add_device_arguments(p)
    return resolve_data_arguments(p.parse_args(argv))


def load_splits(args, device):
    """(train, val, test) as (uint8 images [N, 28, 28], int64 labels [N]) pairs on the device, and the data's fingerprint.

    MNIST brings its own test set; a CSV gives up a stratified --val-fraction of its rows as the test set.
    """
    images, labels = load_data(args, "train")
    if args.data == "csv":
        if args.limit:
            images, labels = images[:args.limit], labels[:args.limit]
        kept, test = stratified_split(labels, args.val_fraction, args.seed)
        test_images, test_labels = images[test], labels[test]
        images, labels = images[kept], labels[kept]
    else:
        test_images, test_labels = load_mnist(args.data_dir, "test")
        if args.limit:
            images, labels = images[:args.limit], labels[:args.limit]
            test_images, test_labels = test_images[:args.limit], test_labels[:args.limit]
    train, val = stratified_split(labels, args.val_fraction, args.seed)
    return (to_device(images, labels, train, device), to_device(images, labels, val, device),
            to_device(test_images, test_labels, torch.arange(len(test_labels)), device), data_fingerprint(images, labels))


def main(argv=None):
    args = parse_args(argv)
    if args.use_deterministic_algorithms:
        use_deterministic_algorithms()
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    checkpoint_path = Path(args.checkpoint)
    check_outputs({"--checkpoint": [checkpoint_path, history_path(checkpoint_path), resume_path(checkpoint_path)]},
                  {"--train-csv": [args.train_csv] if args.data == "csv" else []})
    with checkpoint_lock(checkpoint_path):
        train_and_report(args, device, precision, checkpoint_path)


def train_and_report(args, device, precision, checkpoint_path):
    existing = load_checkpoint(checkpoint_path) if checkpoint_path.exists() and not args.retrain else None
    reuse = existing is not None and is_complete(existing)
    if reuse and existing["arch"] != "vgg":
        raise UserError(f"{checkpoint_path} holds a {existing['arch']} model, not pipeline A's vgg; "
                        "pass another --checkpoint or --retrain")
    train_set, val_set, test_set, fingerprint = load_splits(args, device)
    settings = training_settings(args, "vgg", precision, "val_loss", fingerprint, {"val_fraction": args.val_fraction})
    print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; "
          f"{len(train_set[0])} train / {len(val_set[0])} val / {len(test_set[0])} test images")

    if reuse:
        check_same_run(checkpoint_path, existing.get("settings"), settings, print, resuming=False)
        model, _ = model_from_checkpoint(checkpoint_path, device, existing)
        normalization = existing["normalization"]
        print(f"using {checkpoint_path} (epoch {existing['epoch']}); --retrain to train again")
    else:
        if args.retrain:
            resume_path(checkpoint_path).unlink(missing_ok=True)
        model = new_model("vgg", device, args.seed)
        normalization = settings["normalization"]
        start = time.perf_counter()
        fit(model, train_set, val_set, settings, checkpoint_path, args.seed)
        print(f"training took {time.perf_counter() - start:.0f}s")

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    test_loss, test_acc = loss_and_accuracy(model, *test_set, criterion, normalization, precision)
    errors = round((1 - test_acc) * len(test_set[0]))
    print(f"test loss {test_loss:.4f}  accuracy {test_acc:.4f} ({errors} errors in {len(test_set[0])} images)")


if __name__ == "__main__":
    run_cli(main)
