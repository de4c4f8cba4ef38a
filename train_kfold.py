"""Pipeline B, training: two architectures over stratified folds, 10 models by default.

    python train_kfold.py --train-csv data/digit-recognizer/train.csv          # all folds, both archs
    python train_kfold.py --folds 0 2 --archs resnet                            # a subset, e.g. one job per machine
    torchrun --nproc_per_node=2 train_kfold.py --train-csv ...                  # ranks share the (arch, fold) jobs

Each (arch, fold) job writes models/<arch>_fold<k>.pth (the checkpoint format of train_cnn.py), its history,
and its out-of-fold probabilities. A completed job is skipped on the next run; an interrupted one resumes from
its last epoch. When all jobs are done, rank 0 writes the summary: validation accuracy per fold, per
architecture, and of the out-of-fold ensemble.
"""
import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import (
    AUGMENTATIONS,
    DEFAULT_DATA_DIR,
    UserError,
    add_device_arguments,
    atomic_path,
    check_writable,
    default_kaggle_csv,
    load_checkpoint,
    load_csv,
    load_mnist,
    model_from_checkpoint,
    pick_device,
    pick_precision,
    run_cli,
    share_cpu_threads,
    to_device,
    write_json,
)
from models import MODELS
from train_cnn import fit, new_model, positive_int, predict_logits, resume_path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=["csv", "mnist"], default="csv", help="Kaggle train.csv, or MNIST's 60,000 training images")
    p.add_argument("--train-csv", default=str(default_kaggle_csv("train.csv")), help="Kaggle train.csv (with --data csv)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="folder holding MNIST/raw (with --data mnist; env MNIST_DATA_DIR)")
    p.add_argument("--out", default="models", help="folder for checkpoints, histories, out-of-fold probabilities, summary")
    p.add_argument("--archs", nargs="+", choices=list(MODELS), default=["resnet", "widecnn"])
    p.add_argument("--n-folds", type=positive_int, default=5, help="number of stratified folds")
    p.add_argument("--folds", nargs="+", type=int, help="which folds to train (default: all)")
    p.add_argument("--retrain", action="store_true", help="train jobs again even if complete")
    p.add_argument("--epochs", type=positive_int, default=30, help="epoch budget per model (cosine schedule length)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--patience", type=positive_int, default=10, help="early stop after this many epochs without a better validation accuracy")
    p.add_argument("--augmentation", choices=AUGMENTATIONS, default="strong")
    p.add_argument("--limit", type=positive_int, help="use only the first N training images (smoke runs)")
    p.add_argument("--seed", type=int, default=42)
    add_device_arguments(p)
    args = p.parse_args(argv)
    if args.n_folds < 2:
        p.error("--n-folds must be at least 2")
    args.folds = sorted(set(args.folds if args.folds is not None else range(args.n_folds)))
    if any(not 0 <= k < args.n_folds for k in args.folds):
        p.error(f"--folds must be between 0 and {args.n_folds - 1}")
    return args


def load_training_data(args):
    """(uint8 images [N, 28, 28], int64 labels [N]) on the CPU."""
    if args.data == "mnist":
        images, labels = load_mnist(args.data_dir, train=True)
    else:
        images, labels = load_csv(args.train_csv, labelled=True)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    return images, labels


def fold_indices(labels, n_folds, seed):
    """[(train_idx, val_idx)] per fold from a seeded StratifiedKFold: the same folds on every rank and every run."""
    from sklearn.model_selection import StratifiedKFold
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    try:
        return [(torch.from_numpy(tr), torch.from_numpy(va)) for tr, va in splitter.split(np.zeros(len(labels)), labels.numpy())]
    except ValueError as error:
        raise UserError(f"cannot split {len(labels)} images into {n_folds} stratified folds ({error})") from None


# ----------------------------------------------------------------------------- job files

def checkpoint_path(out, arch, fold):
    return Path(out) / f"{arch}_fold{fold}.pth"


def oof_path(out, arch, fold):
    return Path(out) / f"{arch}_fold{fold}.oof.npz"


def save_oof(path, indices, labels, probs):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, indices=indices.numpy(), labels=labels.numpy(), probs=probs.numpy())


def is_complete(path):
    return path.exists() and load_checkpoint(path).get("complete", False)


# ----------------------------------------------------------------------------- one (arch, fold) job

def run_job(args, arch, fold, images, labels, split, device, precision, log):
    """Train one model on the other folds (or reuse its complete checkpoint), save its out-of-fold probabilities."""
    out_ckpt = checkpoint_path(args.out, arch, fold)
    train_idx, val_idx = split
    val_set = to_device(images, labels, val_idx, device)
    start = time.perf_counter()
    if not args.retrain and is_complete(out_ckpt):
        model, _ = model_from_checkpoint(out_ckpt, device)
    else:
        if args.retrain:
            resume_path(out_ckpt).unlink(missing_ok=True)
        seed = args.seed + 100 * fold + list(MODELS).index(arch)  # distinct, reproducible per job
        model = new_model(arch, device, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        settings = {"epochs": args.epochs, "batch_size": args.batch_size, "precision": precision,
                    "augmentation": AUGMENTATIONS[args.augmentation], "label_smoothing": args.label_smoothing,
                    "monitor": "val_accuracy", "patience": args.patience}
        fit(model, arch, to_device(images, labels, train_idx, device), val_set, optimizer, scheduler, settings,
            out_ckpt, seed, log=lambda line: log(f"[{arch} fold {fold}] {line}"))
    probs = torch.softmax(predict_logits(model, val_set[0], precision), 1).cpu()  # [N_val, 10]
    save_oof(oof_path(args.out, arch, fold), val_idx, labels[val_idx], probs)
    log(f"[{arch} fold {fold}] done in {time.perf_counter() - start:.0f}s, "
        f"val accuracy {(probs.argmax(1) == labels[val_idx]).float().mean():.4f}")


# ----------------------------------------------------------------------------- summary

def summarize(args, labels):
    """Per-fold, per-architecture and out-of-fold-ensemble validation accuracy from the job files on disk."""
    table = {}
    ensemble_sum = torch.zeros(len(labels), 10)
    covered = torch.zeros(len(labels), dtype=torch.long)
    for arch in args.archs:
        arch_probs = torch.full((len(labels), 10), float("nan"))
        for fold in range(args.n_folds):
            path = oof_path(args.out, arch, fold)
            if not path.exists():
                continue
            saved = np.load(path)
            indices = torch.from_numpy(saved["indices"])
            if indices.max() >= len(labels) or not torch.equal(torch.from_numpy(saved["labels"]), labels[indices]):
                raise UserError(f"{path} was made from other training data; use --retrain or another --out")
            probs = torch.from_numpy(saved["probs"])
            arch_probs[indices] = probs
            table.setdefault(arch, {})[f"fold{fold}"] = (probs.argmax(1) == labels[indices]).float().mean().item()
        done = ~arch_probs.isnan().any(1)
        if done.any():
            table[arch]["out_of_fold"] = (arch_probs[done].argmax(1) == labels[done]).float().mean().item()
            table[arch]["images"] = int(done.sum())
            ensemble_sum[done] += arch_probs[done]
            covered += done
    everywhere = covered == len(args.archs)
    summary = {"n_folds": args.n_folds, "seed": args.seed, "architectures": table}
    if everywhere.any():
        summary["ensemble_out_of_fold"] = (ensemble_sum[everywhere].argmax(1) == labels[everywhere]).float().mean().item()
        summary["ensemble_images"] = int(everywhere.sum())
    write_json(Path(args.out) / "summary.json", summary)
    print_summary(summary, args.n_folds)


def print_summary(summary, n_folds):
    folds = [f"fold{k}" for k in range(n_folds)]
    print(f"{'validation accuracy':<20}" + "".join(f"{f:>9}" for f in folds) + f"{'OOF':>9}")
    for arch, row in summary["architectures"].items():
        cells = "".join(f"{row[f]:>9.4f}" if f in row else f"{'-':>9}" for f in folds)
        print(f"{arch:<20}{cells}{row.get('out_of_fold', float('nan')):>9.4f}")
    if "ensemble_out_of_fold" in summary:
        print(f"{'ensemble (OOF)':<20}{'':>{9 * n_folds}}{summary['ensemble_out_of_fold']:>9.4f}"
              f"  on {summary['ensemble_images']} images")


# ----------------------------------------------------------------------------- ranks

def distributed_context():
    """(rank, world_size, local_rank): torchrun's environment, or a single process."""
    if "RANK" not in os.environ:
        return 0, 1, None
    # gloo for the one thing ranks share, a final barrier; it works whether the jobs run on CPUs or GPUs.
    # A rank that finishes early may wait for hours at that barrier, hence the long timeout.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def main(argv=None):
    args = parse_args(argv)
    rank, world, local_rank = distributed_context()
    device = pick_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores instead of fighting over them
        share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    precision = pick_precision(args.precision, device)
    log = print if world == 1 else (lambda line: print(f"rank {rank}: {line}", flush=True))

    check_writable(Path(args.out) / "summary.json")
    images, labels = load_training_data(args)
    splits = fold_indices(labels, args.n_folds, args.seed)
    jobs = [(arch, fold) for arch in args.archs for fold in args.folds]
    mine = jobs[rank::world]
    log(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; {len(images)} images, "
        f"{args.n_folds} folds; jobs {', '.join(f'{a}/{f}' for a, f in mine) or 'none'}")
    for arch, fold in mine:
        if not args.retrain and oof_path(args.out, arch, fold).exists() and is_complete(checkpoint_path(args.out, arch, fold)):
            log(f"[{arch} fold {fold}] complete, skipped (--retrain to train again)")
            continue
        run_job(args, arch, fold, images, labels, splits[fold], device, precision, log)

    if world > 1:
        dist.barrier()
    if rank == 0:
        summarize(args, labels)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
