"""Pipeline A: train the VGG-style CNN on MNIST (or a Kaggle train.csv) and report test accuracy.

    python train_cnn.py --data-dir ../shared/data          # train, or reuse CNN_best_model.pth if it exists
    python train_cnn.py --epochs 3 --limit 2000 --retrain   # a quick smoke run

The epoch, evaluation and fit functions below are shared with train_kfold.py. The training loop keeps
the whole data set on the device and never waits for it inside an epoch: metrics accumulate there and
are read once per epoch. An interrupted run resumes from its last epoch when the command is repeated.
"""
import argparse
import time
from pathlib import Path

import torch
from torch import nn

from data import (
    AUGMENTATIONS,
    DEFAULT_DATA_DIR,
    NORMALIZATION,
    UserError,
    add_device_arguments,
    autocast,
    batch_indices,
    check_writable,
    library_versions,
    load_checkpoint,
    load_csv,
    load_mnist,
    model_from_checkpoint,
    pick_device,
    pick_precision,
    prepare_batch,
    progress_bar,
    run_cli,
    save_checkpoint,
    stratified_split,
    to_device,
    uses_channels_last,
    write_json,
)
from models import build_model

# Inference batch: on a CPU, 1024 images of resnet's first stage (100 MB of activations) fall out of the cache and
# its ReLU and BatchNorm passes wait on memory; 128-256 ran 1.4-1.9x faster here. A GPU is kept busy by 256 too.
EVAL_BATCH_SIZE = 256


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(model, images, labels, optimizer, criterion, scaler, settings, generators):
    """One pass over images (uint8 [N, 28, 28] on the device) in shuffled batches: (mean loss, accuracy)."""
    model.train()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    batches = batch_indices(len(images), settings["batch_size"], generators["shuffle"])
    progress = progress_bar(len(batches), "train")
    for index in batches:
        if len(index) < 2:  # BatchNorm cannot train on a single image
            continue
        x = prepare_batch(images[index], NORMALIZATION, settings["augmentation"], generators["augment"])  # [B, 1, 28, 28]
        y = labels[index]
        with autocast(device, settings["precision"]):
            logits = model(x)                                                      # [B, 10]
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(1) == y).sum()
        seen += len(index)
        progress.update()
    progress.close()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1)


@torch.inference_mode()
def predict_logits(model, images, precision, batch_size=EVAL_BATCH_SIZE):
    """Logits [N, 10] (float32) for uint8 images [N, 28, 28] on the model's device, in eval mode."""
    model.eval()
    outputs = []
    for index in batch_indices(len(images), batch_size):
        x = prepare_batch(images[index], NORMALIZATION)
        with autocast(images.device, precision):
            outputs.append(model(x).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=images.device)


def evaluate(model, images, labels, criterion, precision):
    """(mean loss, accuracy) on a labelled set, without augmentation."""
    logits = predict_logits(model, images, precision)
    loss = criterion(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- fit: epochs, early stopping, files

def history_path(checkpoint_path):
    return Path(checkpoint_path).with_suffix(".history.json")


def resume_path(checkpoint_path):
    """Per-epoch training state beside the best checkpoint; removed once training completes."""
    return Path(checkpoint_path).with_suffix(".resume.pth")


def make_generators(seed, device):
    """One generator per purpose, so a resumed run replays exactly the shuffling and augmentation it would have."""
    return {"shuffle": torch.Generator(device).manual_seed(seed + 1),
            "augment": torch.Generator(device).manual_seed(seed + 2)}


def rng_state(generators):
    state = {name: g.get_state() for name, g in generators.items()}
    state["torch"] = torch.get_rng_state()  # dropout draws from the global generator
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generators, state):
    for name, g in generators.items():
        g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_better(value, best, monitor):
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def fit(model, arch, train_set, val_set, optimizer, scheduler, settings, checkpoint_path, seed, log=print):
    """Train until settings['epochs'] or early stopping; the best epoch by settings['monitor'] is kept.

    Files: the best checkpoint (rewritten on each improvement, marked complete at the end), the
    history JSON, and a resume file written every epoch, so a killed run loses at most one epoch.
    Returns the history (one dict per epoch) and leaves the best weights loaded in `model`.
    """
    device = train_set[0].device
    criterion = nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"])
    scaler = torch.amp.GradScaler(device.type, enabled=settings["precision"] == "fp16")
    generators = make_generators(seed, device)
    state = {"epoch": 0, "best": None, "best_epoch": None, "stale_epochs": 0, "history": []}
    resume = resume_path(checkpoint_path)
    if resume.exists():
        saved = load_checkpoint(resume, required=("model_state", "optimizer_state", "scheduler_state", "rng", "progress"))
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"])
        scheduler.load_state_dict(saved["scheduler_state"])
        scaler.load_state_dict(saved["scaler_state"])
        set_rng_state(generators, saved["rng"])
        state = saved["progress"]
        log(f"resuming {checkpoint_path} after epoch {state['epoch']} from {resume}")

    monitor, patience = settings["monitor"], settings["patience"]
    while state["epoch"] < settings["epochs"] and state["stale_epochs"] < patience:
        start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(model, *train_set, optimizer, criterion, scaler, settings, generators)
        train_seconds = time.perf_counter() - start
        val_loss, val_acc = evaluate(model, *val_set, criterion, settings["precision"])
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "train_loss": train_loss, "train_accuracy": train_acc,
                  "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                  "seconds": time.perf_counter() - start, "images_per_second": len(train_set[0]) / train_seconds}
        state["history"].append(record)
        value = record[monitor]
        if is_better(value, state["best"], monitor):
            state.update(best=value, best_epoch=state["epoch"], stale_epochs=0)
            save_checkpoint(checkpoint_path, checkpoint_dict(model, arch, settings, record, complete=False))
        else:
            state["stale_epochs"] += 1
        save_checkpoint(resume, {
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(), "scaler_state": scaler.state_dict(),
            "rng": rng_state(generators), "progress": state, "arch": arch})
        write_json(history_path(checkpoint_path), state["history"])
        log(f"epoch {state['epoch']:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2e}  {record['seconds']:.1f}s  "
            f"{record['images_per_second']:.0f} img/s" + ("  *" if state["best_epoch"] == state["epoch"] else ""))
    if state["stale_epochs"] >= patience:
        log(f"early stop: {monitor} did not improve for {patience} epochs")

    # Mark the best checkpoint complete, then drop the resume file: a run is finished only when both are done.
    best = load_checkpoint(checkpoint_path)
    best["complete"] = True
    save_checkpoint(checkpoint_path, best)
    resume.unlink(missing_ok=True)
    model.load_state_dict(best["model_state"])
    log(f"best epoch {state['best_epoch']} ({monitor} {state['best']:.4f}) saved to {checkpoint_path}")
    return state["history"]


def checkpoint_dict(model, arch, settings, record, complete):
    """The checkpoint format every script reads: plain types and tensors only (weights_only loadable)."""
    return {"model_state": model.state_dict(), "arch": arch, "normalization": dict(NORMALIZATION),
            "precision": settings["precision"], "epoch": record["epoch"],
            "metrics": {"val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"]},
            "versions": library_versions(), "complete": complete}


def new_model(arch, device, seed):
    """A freshly initialised model on the device; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    model = build_model(arch)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)


# ----------------------------------------------------------------------------- pipeline A's command line

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding MNIST/raw/*.gz (env MNIST_DATA_DIR)")
    p.add_argument("--train-csv", help="train on a Kaggle train.csv instead of MNIST; a stratified part is held out as test set")
    p.add_argument("--checkpoint", default="CNN_best_model.pth", help="best-model file; reused if complete")
    p.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    p.add_argument("--epochs", type=positive_int, default=50, help="upper bound on epochs")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-step", type=positive_int, default=10, help="StepLR: epochs between learning-rate cuts")
    p.add_argument("--lr-gamma", type=float, default=0.5, help="StepLR: factor at each cut")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--patience", type=positive_int, default=5, help="early stop after this many epochs without a lower validation loss")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default="light")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="stratified validation share of the training set")
    p.add_argument("--limit", type=positive_int, help="use only the first N training and N test images (smoke runs)")
    p.add_argument("--seed", type=int, default=42)
    add_device_arguments(p)
    return p.parse_args(argv)


def load_splits(args, device):
    """(train, val, test) as (uint8 images [N, 28, 28], int64 labels [N]) pairs on the device."""
    if args.train_csv:
        images, labels = load_csv(args.train_csv, labelled=True)
        if args.limit:
            images, labels = images[:args.limit], labels[:args.limit]
        kept, test = stratified_split(labels, args.val_fraction, args.seed)
        test_images, test_labels = images[test], labels[test]
        images, labels = images[kept], labels[kept]
    else:
        images, labels = load_mnist(args.data_dir, train=True)
        test_images, test_labels = load_mnist(args.data_dir, train=False)
        if args.limit:
            images, labels = images[:args.limit], labels[:args.limit]
            test_images, test_labels = test_images[:args.limit], test_labels[:args.limit]
    train, val = stratified_split(labels, args.val_fraction, args.seed)
    return (to_device(images, labels, train, device), to_device(images, labels, val, device),
            to_device(test_images, test_labels, torch.arange(len(test_labels)), device))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    checkpoint_path = Path(args.checkpoint)
    existing = load_checkpoint(checkpoint_path) if checkpoint_path.exists() and not args.retrain else None
    reuse = existing is not None and existing.get("complete")
    if reuse and existing["arch"] != "vgg":
        raise UserError(f"{checkpoint_path} holds a {existing['arch']} model, not pipeline A's vgg; "
                        "pass another --checkpoint or --retrain")
    if not reuse:
        check_writable(checkpoint_path)
    train_set, val_set, test_set = load_splits(args, device)
    print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; "
          f"{len(train_set[0])} train / {len(val_set[0])} val / {len(test_set[0])} test images")

    if reuse:
        model, _ = model_from_checkpoint(checkpoint_path, device, existing)
        print(f"using {checkpoint_path} (epoch {existing['epoch']}); --retrain to train again")
    else:
        if args.retrain:
            resume_path(checkpoint_path).unlink(missing_ok=True)
        model = new_model("vgg", device, args.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
        settings = {"epochs": args.epochs, "batch_size": args.batch_size, "precision": precision,
                    "augmentation": AUGMENTATIONS[args.augmentation], "label_smoothing": args.label_smoothing,
                    "monitor": "val_loss", "patience": args.patience}
        start = time.perf_counter()
        fit(model, "vgg", train_set, val_set, optimizer, scheduler, settings, checkpoint_path, args.seed)
        print(f"training took {time.perf_counter() - start:.0f}s")

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    test_loss, test_acc = evaluate(model, *test_set, criterion, precision)
    errors = round((1 - test_acc) * len(test_set[0]))
    print(f"test loss {test_loss:.4f}  accuracy {test_acc:.4f} ({errors} errors in {len(test_set[0])} images)")


if __name__ == "__main__":
    run_cli(main)
