"""Pipeline B, training: two architectures over stratified folds, 10 models, for predict_tta.py's submission.

The recipe, RECIPE below: pipeline A's (train_cnn.py) with these changes, each value a flag grouped in --help
    models          resnet and widecnn (models.py), each trained on 4 of 5 stratified folds and validated on the
                    fifth: 10 models, every training image validated once per architecture (out of fold)
    data            Kaggle's train.csv (42,000 digits; its input folder in a kernel), or MNIST's with --data mnist
    augmentation    strong, per image on the device: rotation up to 15 degrees, shear up to 10, shift up to 10%,
                    scale 0.9-1.1, and a perspective warp on half the images
    optimizer       AdamW, peak rate 1e-3, weight decay 1e-4, batches of 128
    schedule        cosine to 0 by epoch over 30 epochs; early stop after 10 without a higher validation accuracy
    regularization  label smoothing 0.1; an EMA of the weights (decay 0.999)
Its out-of-fold and test accuracies, and Kaggle's score of its submission: the README (Results).

    python train_kfold.py --train-csv data/digit-recognizer/train.csv          # all folds, both archs
    python train_kfold.py --folds 0 2 --archs resnet                            # a subset, e.g. one job per machine
    torchrun --nproc_per_node=2 train_kfold.py --train-csv ...                  # ranks share the (arch, fold) jobs

Each (arch, fold) job writes models/<arch>_fold<k>.pth (train_cnn.py's checkpoint), its history and its out-of-fold
probabilities. A completed job is skipped on the next run; an interrupted one resumes from its last epoch. When all
jobs are done, rank 0 writes the summary: validation accuracy per fold, per architecture, and of the out-of-fold
ensemble. In this file: the folds, one job, the summary, main; below one banner, each job's run (its files are named
in checkpoints.py), dealing jobs to torchrun's ranks, and the ranks themselves.
"""
import contextlib
import datetime
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import cli
import data
import train_cnn
from models import ARCH_NUMBERS, MODELS

# Pipeline B's recipe: pipeline A's (its validation share aside: here the folds decide), with these changes.
RECIPE = {**{name: value for name, value in train_cnn.RECIPE.items() if name != "val_fraction"},
          "archs": ["resnet", "widecnn"], "n_folds": 5, "epochs": 30, "patience": 10,
          "optimizer": "adamw", "augmentation": "strong", "schedule": "cosine"}


# ----------------------------------------------------------------------------- folds

def fold_indices(labels, n_folds, seed):
    """[(train_idx, val_idx)] per fold from a seeded StratifiedKFold: the same folds on every rank and every run."""
    from sklearn.model_selection import StratifiedKFold
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    try:
        return [(torch.from_numpy(tr), torch.from_numpy(va)) for tr, va in splitter.split(np.zeros(len(labels)),
                                                                                          labels.numpy())]
    except ValueError as error:
        raise cli.UserError(f"cannot split {len(labels)} images into {n_folds} stratified folds ({error})") from None


def job_sets(kfold, fold):
    """(train_set, val_set) of a fold on the device: the other folds, and this one."""
    train_idx, val_idx = kfold.splits[fold]
    return (data.subset_on_device(kfold.images, kfold.labels, train_idx, kfold.device),
            data.subset_on_device(kfold.images, kfold.labels, val_idx, kfold.device))


def job_sizes(kfold, fold):
    """(training images, validation images) of a fold's job, from its indices alone."""
    train_idx, val_idx = kfold.splits[fold]
    return len(train_idx), len(val_idx)


def job_seed(seed, arch, fold):
    """The seed of an (arch, fold) job's model and generators: distinct per job, from the architecture's name."""
    return seed + 100 * fold + ARCH_NUMBERS[arch]


# ----------------------------------------------------------------------------- one (arch, fold) job

def run_job(kfold, arch, fold, run, finished):
    """Train one model on the other folds (or reuse its finished checkpoint), save its out-of-fold probabilities."""
    if finished is not None and checkpoints.oof_path(kfold.args.out, arch, fold).exists():
        run.log("complete, skipped (--retrain to train again)")
        return
    _, val_idx = kfold.splits[fold]
    val_set = data.subset_on_device(kfold.images, kfold.labels, val_idx, kfold.device)
    start = time.perf_counter()
    if finished is not None:
        model, normalization = train_cnn.reused_model(run, finished, kfold.device)
    else:
        model, normalization = train_cnn.train_new_model(run, kfold.device, *job_sets(kfold, fold), start)
    logits = train_cnn.predict_logits(model, val_set[0], normalization, kfold.precision)
    probs = torch.softmax(logits, 1).cpu()                                                           # [N_val, 10]
    cli.write_numpy(checkpoints.oof_path(kfold.args.out, arch, fold), {"indices": val_idx.numpy(),
                                                                       "labels": kfold.labels[val_idx].numpy(),
                                                                       "probs": probs.numpy()})
    accuracy = (probs.argmax(1) == kfold.labels[val_idx]).float().mean()
    run.log(f"done in {time.perf_counter() - start:.0f}s, val accuracy {accuracy:.4f}")


# ----------------------------------------------------------------------------- summary

def summarize(args, labels):
    """Per-fold, per-architecture and out-of-fold-ensemble validation accuracy from the job files on disk."""
    table = {}
    ensemble_sum = torch.zeros(len(labels), 10)
    covered = torch.zeros(len(labels), dtype=torch.long)
    for arch in args.archs:
        arch_probs = torch.full((len(labels), 10), float("nan"))
        for fold in range(args.n_folds):
            path = checkpoints.oof_path(args.out, arch, fold)
            if not path.exists():
                continue
            saved = np.load(path)
            indices = torch.from_numpy(saved["indices"])
            if indices.max() >= len(labels) or not torch.equal(torch.from_numpy(saved["labels"]), labels[indices]):
                raise cli.UserError(f"{path} was made from other training data; use --retrain or another --out")
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
        correct = ensemble_sum[everywhere].argmax(1) == labels[everywhere]
        summary["ensemble_out_of_fold"] = correct.float().mean().item()
        summary["ensemble_images"] = int(everywhere.sum())
    cli.write_json(Path(args.out) / "summary.json", summary)
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


# ----------------------------------------------------------------------------- pipeline B's command line and main

def parse_args(argv=None):
    parser = cli.Parser(__doc__)
    data.add_data_arguments(parser.add_argument_group("data"), default="csv", split="train")
    model = parser.add_argument_group("model and length")
    model.add_argument("--archs", nargs="+", choices=list(MODELS), default=RECIPE["archs"])
    model.add_argument("--n-folds", type=cli.positive_int, default=RECIPE["n_folds"], help="number of stratified folds")
    model.add_argument("--folds", nargs="+", type=int, help="which folds to train (default: all)")
    train_cnn.add_training_arguments(parser, RECIPE, model)
    data.add_device_arguments(parser, training=True)
    files = parser.add_argument_group("files")
    files.add_argument("--out", default="models",
                       help="folder for checkpoints, histories, out-of-fold probabilities, summary")
    files.add_argument("--retrain", action="store_true", help="train jobs again even if complete")
    args = train_cnn.resolve_training_arguments(data.resolve_data_arguments(parser.parse_args(argv)), RECIPE)
    if args.n_folds < 2:
        parser.error("--n-folds must be at least 2")
    args.folds = sorted(set(args.folds if args.folds is not None else range(args.n_folds)))
    if any(not 0 <= k < args.n_folds for k in args.folds):
        parser.error(f"--folds must be between 0 and {args.n_folds - 1}")
    return args


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    if args.use_deterministic_algorithms:
        data.use_deterministic_algorithms()
    rank, world, local_rank = distributed_context()
    device = data.pick_device(args.device, local_rank)  # under torchrun: cuda:LOCAL_RANK, made current
    if device.type == "cpu":  # ranks on one machine share its cores instead of fighting over them
        data.share_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    precision = data.pick_precision(args.precision, device)
    log = print if world == 1 else (lambda line: print(f"rank {rank}: {line}", flush=True))

    jobs = [(arch, fold) for arch in args.archs for fold in args.folds]
    outputs = [Path(args.out) / "summary.json", *(p for job in jobs for p in checkpoints.job_files(args.out, *job))]
    cli.check_outputs({"--out": outputs}, {"--train-csv": [args.train_csv] if args.data == "csv" else []})
    mine = deal_jobs(jobs, world, {job: job_cost(args.out, *job) for job in jobs})[rank]
    with contextlib.ExitStack() as locks:  # this rank's checkpoints are its own until it ends
        for job in mine:
            locks.enter_context(checkpoints.checkpoint_lock(checkpoints.job_checkpoint(args.out, *job)))
        images, labels = data.load_data(args, "train")
        kfold = KFold(args, images, labels, fold_indices(labels, args.n_folds, args.seed), device, precision, log)
        log(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; {len(images)} images, "
            f"{args.n_folds} folds; jobs {', '.join(f'{a}/{f}' for a, f in mine) or 'none'}")
        fingerprint = checkpoints.data_fingerprint(images, labels)
        runs = {job: job_run(kfold, *job, fingerprint) for job in mine}
        # every finished job is checked against this run's settings before any training starts
        existing = {job: checkpoints.existing_checkpoint(runs[job].checkpoint, args.retrain) for job in mine}
        for job in mine:
            train_cnn.adopt_saved_plan(runs[job], existing[job])
        finished = {job: checkpoints.finished_checkpoint(runs[job], existing[job]) for job in mine}
        unplanned = [job for job in mine if train_cnn.needs_plan(runs[job]) and finished[job] is None]
        if unplanned:
            budget_jobs = []
            for arch, fold in unplanned:  # each predicts its fold's validation images after training (out of fold)
                sizes = job_sizes(kfold, fold)
                budget_jobs.append((runs[(arch, fold)], sizes, functools.partial(job_sets, kfold, fold), sizes[1]))
            train_cnn.plan_budget(budget_jobs, device, started)
        for job in mine:
            run_job(kfold, *job, runs[job], finished[job])
        if args.budget:
            log(f"training took {time.perf_counter() - started:.0f}s of --budget {cli.format_duration(args.budget)}")

    if world > 1:
        dist.barrier()
    if rank == 0:
        summarize(args, labels)
    if world > 1:
        dist.destroy_process_group()


# ============================================================================= machinery
# Below: what main runs the jobs with: the state every job shares and each job's run (checkpoints.Run, its files
# named by checkpoints.job_files), dealing the jobs over torchrun's ranks by cost, and the ranks themselves.


@dataclass
class KFold:
    """What every job of this process shares: the flags, the training data and its folds, the device, the log."""
    args: object
    images: torch.Tensor  # uint8 [N, 28, 28], on the CPU
    labels: torch.Tensor  # int64 [N]
    splits: list          # [(train_idx, val_idx)] per fold
    device: torch.device
    precision: str
    log: Callable[[str], None]


def job_run(kfold, arch, fold, fingerprint):
    """The Run of one (arch, fold) job: its checkpoint, settings (the job seed recorded) and log prefix."""
    args = kfold.args
    seed = job_seed(args.seed, arch, fold)
    settings, flags = train_cnn.training_settings(args, {"arch": arch, "data": fingerprint,
                                                         "split": {"n_folds": args.n_folds, "fold": fold},
                                                         "monitor": "val_accuracy", "precision": kfold.precision})
    settings["job_seed"] = seed  # after --seed, from which it follows: a changed --seed is named as such
    return checkpoints.Run(checkpoints.job_checkpoint(args.out, arch, fold), settings, flags, seed=seed,
                           retrain=args.retrain, log=lambda line: kfold.log(f"[{arch} fold {fold}] {line}"),
                           # checkpoints written before the job seed was recorded were made with this seed
                           added_settings={"job_seed": lambda saved: job_seed(saved["seed"], saved["arch"],
                                                                              saved["split"]["fold"])})


# Training time per image relative to widecnn, from `make bench` on a CPU (README, Speed): deals k-fold jobs evenly.
TRAINING_COST = {"vgg": 0.5, "resnet": 2.3, "widecnn": 1.0}


def job_cost(out, arch, fold):
    """TRAINING_COST of the job's architecture; nothing when it is already complete (it will be skipped)."""
    path = checkpoints.job_checkpoint(out, arch, fold)
    done = (path.exists() and checkpoints.oof_path(out, arch, fold).exists()
            and checkpoints.is_complete(checkpoints.load(path)))
    return 0.0 if done else TRAINING_COST[arch]


def deal_jobs(jobs, world, costs):
    """Jobs per rank, so the ranks finish close together: the costliest first, each to the least-loaded rank.

    costs: {job: relative cost}; a rank's list keeps the jobs in the order it will run them.
    """
    loads, dealt = [0.0] * world, [[] for _ in range(world)]
    for job in sorted(jobs, key=lambda job: -costs[job]):  # sorted() is stable: ties keep the jobs' order
        rank = loads.index(min(loads))
        loads[rank] += costs[job]
        dealt[rank].append(job)
    return dealt


def distributed_context():
    """(rank, world_size, local_rank): torchrun's environment, or a single process."""
    if "RANK" not in os.environ:
        return 0, 1, None
    # gloo for the one thing ranks share, a final barrier; it works whether the jobs run on CPUs or GPUs.
    # A rank that finishes early may wait for hours at that barrier, hence the long timeout.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


if __name__ == "__main__":
    cli.run_cli(main)
