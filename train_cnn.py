"""Pipeline A: one VGG-style CNN on MNIST (or a Kaggle train.csv), then its test accuracy.

The recipe, RECIPE below (each value is a flag, grouped in --help)
    model           vgg (models.py): two conv pairs with pooling and Dropout2d, a 128-channel conv, an MLP head
    data            MNIST's 60,000 training digits, a stratified 10% held out for validation; the test set is read
                    once, at the end, to report (a CSV gives up a stratified 10% of its rows as the test set)
    augmentation    light, per image on the device: rotation up to 10 degrees, shift up to 10%, scale 0.9-1.1
    optimizer       Adam, peak rate 1e-3, batches of 128
    schedule        step: x0.5 every 10 epochs; 50 epochs, early stop after 5 without a lower validation loss
    regularization  label smoothing 0.1; an EMA of the weights (decay 0.999), which is validated, saved and used
    --budget 10m    the run measures its own speed, then plans its steps to end within 10 minutes, warmup-linear
                    from a peak of 6e-3 to zero on the planned last step
The released model in weights/ is this recipe with --epochs 30 --schedule warmup-linear --lr 6e-3. For other people's
writing, --augmentation writers adds other pens, hands and cameras (augmentation.py: strokes finer and broader,
elastic distortion, blur, coarse resolution, faint ink) and --typefaces N drawings in handwriting typefaces
(typefaces.py's training half) to MNIST's digits; the benchmark recipes train on MNIST alone. What each recipe
reaches, in what time, on which machine: the README (Results; Training to a time budget; Other people's writing).

    python train_cnn.py --data-dir ../shared/data          # the recipe: CNN_best_model.pth, then the test report
    python train_cnn.py --epochs 3 --limit 2000 --retrain   # a quick smoke run

In this file: the training step, the optimizer, schedule and EMA, fit (epochs, validation, early stopping), then
main; below one banner, the budget planner. The loop keeps the whole data set on the device and reads its metrics
once per epoch. The files a run keeps beside its checkpoint (lock, settings check, exact resume) are
checkpoints.py's; train_kfold.py trains its jobs with the same functions.
"""
import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import augmentation
import checkpoints
import cli
import data
import typefaces
from models import build_model

# Pipeline A's recipe: argparse's defaults, and what --epochs, --lr and --schedule resolve to when not given (their
# flags default to None, since --budget decides them). train_kfold.py's recipe starts from this one.
RECIPE = {"batch_size": 128, "epochs": 50, "patience": 5, "seed": 42, "val_fraction": 0.1,
          "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4,
          "augmentation": "light", "label_smoothing": 0.1, "ema_decay": 0.999,
          "schedule": "step", "lr_step": 10, "lr_gamma": 0.5, "warmup_epochs": 0.3}
# The schedules that reach zero on the last step, whatever its number: the ones a --budget run may use.
BUDGET_SCHEDULES = ("warmup-linear", "warmup-cosine")
# What --budget changes: the first of those schedules, and a higher peak rate that only such a schedule bears
# (chosen on validation, docs/measurements.md).
BUDGET_RECIPE = {"schedule": BUDGET_SCHEDULES[0], "lr": 6e-3}
# Each schedule and the settings it reads besides --lr and --epochs (see lr_factor).
SCHEDULE_SETTINGS = {"step": ("lr_step", "lr_gamma"), "cosine": (), "warmup-cosine": ("warmup_epochs",),
                     "warmup-linear": ("warmup_epochs",)}


# ----------------------------------------------------------------------------- the training step

@dataclass
class Training:
    """What a run trains with besides the model, built once by fit and restored on resume."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    generators: dict  # "shuffle" and "augment": torch.Generator on the device
    ema: "EMA | None"

    def evaluated(self, model):
        """What is validated, saved and predicted: the EMA's weights when the EMA is on, else the model itself."""
        return model if self.ema is None else self.ema.module


def train_one_epoch(model, images, labels, training, settings):
    """One pass over images (uint8 [N, 28, 28] on the device) in shuffled batches: (mean loss, accuracy, finite, seen).

    The learning rate moves every step; the EMA (if any) follows the weights. finite is False when a loss was
    NaN or Inf: a flag kept on the device, read once with the epoch's metrics. seen: the images trained on
    (fewer than all in the last epoch of a budget).
    """
    model.train()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    finite = torch.ones((), device=device, dtype=torch.bool)
    seen = 0
    preset = augmentation.AUGMENTATIONS[settings["augmentation"]]
    batches = data.batch_indices(len(images), settings["batch_size"], training.generators["shuffle"])
    if settings.get("planned_steps"):  # a budget's last epoch ends on its planned step
        batches = batches[:settings["planned_steps"] - training.scheduler.last_epoch]
    progress = data.progress_bar(len(batches), "train")
    for index in batches:
        if len(index) < 2:  # BatchNorm cannot train on a single image
            continue
        # [B, 1, 28, 28]
        x = data.prepare_batch(images[index], settings["normalization"], preset, training.generators["augment"])
        y = labels[index]
        with data.autocast(device, settings["precision"]):
            logits = model(x)                                                      # [B, 10]
            loss = training.criterion(logits, y)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.scheduler.step()
        if training.ema is not None:
            training.ema.update(model)
        finite &= torch.isfinite(loss.detach())
        loss_sum += loss.detach() * len(index)
        correct += (logits.argmax(1) == y).sum()
        seen += len(index)
        progress.update()
    progress.close()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), bool(finite), seen


@torch.inference_mode()
def predict_logits(model, images, normalization, precision):
    """Logits [N, 10] (float32) for uint8 images [N, 28, 28] on the model's device, in eval mode."""
    model.eval()
    outputs = []
    for index in data.batch_indices(len(images), data.EVAL_BATCH_SIZE):
        x = data.prepare_batch(images[index], normalization)
        with data.autocast(images.device, precision):
            outputs.append(model(x).float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=images.device)


def loss_and_accuracy(model, images, labels, criterion, normalization, precision):
    """(mean loss, accuracy) of the model on a labelled set, without augmentation."""
    logits = predict_logits(model, images, normalization, precision)
    loss = criterion(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------- optimizer, schedule, EMA

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
    warmup-linear: linear from 0 to 1 over warmup_epochs, then linear to 0 at the last step, every step
    The last step is the budget's planned one (settings['planned_steps']), else that of the last epoch.
    """
    epoch = step // steps
    if settings["schedule"] == "step":
        return settings["lr_gamma"] ** (epoch // settings["lr_step"])
    if settings["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / settings["epochs"]))
    total = settings.get("planned_steps") or steps * settings["epochs"]
    warmup = min(round(settings["warmup_epochs"] * steps), total - 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)  # 0 after the warm-up, 1 on the step after the last
    if settings["schedule"] == "warmup-linear":
        return 1 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(optimizer, settings, steps):
    """A LambdaLR stepped after every optimizer step; `steps` per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, settings))


class EMA:
    """The EMA (exponential moving average) of the weights and BatchNorm statistics, updated after every step.

    The first update copies the weights; after that the decay warms up as (1 + t) / (10 + t) until it reaches
    `decay`, so the first steps (random weights) fade quickly and a short run averages over its last tenth
    instead of carrying its start. The EMA is a copy of the model on its device, moved with one foreach lerp
    per step and a step count kept on the host: nothing waits for a GPU (torch's AveragedModel keeps its count
    in a tensor and reads it back on every update).
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


# ----------------------------------------------------------------------------- fit: epochs, validation, early stopping

def make_training(model, settings, steps, seed):
    """The optimizer, schedule (`steps` per epoch), loss, gradient scaler, generators and EMA of a new run."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, settings)
    return Training(optimizer=optimizer, scheduler=make_schedule(optimizer, settings, steps),
                    criterion=nn.CrossEntropyLoss(label_smoothing=settings["label_smoothing"]),
                    scaler=torch.amp.GradScaler(device.type, enabled=settings["precision"] == "fp16"),
                    generators=make_generators(seed, device),
                    ema=EMA(model, settings["ema_decay"]) if settings["ema_decay"] > 0 else None)


def make_generators(seed, device):
    """One generator per purpose, so a resumed run replays exactly the shuffling and augmentation it would have."""
    return {"shuffle": torch.Generator(device).manual_seed(seed + 1),
            "augment": torch.Generator(device).manual_seed(seed + 2)}


def fit(model, train_set, val_set, run):
    """Train until the run's epochs or early stopping; the best epoch by settings['monitor'] is kept.

    Files: the best checkpoint (rewritten on each improvement, marked complete at the end), the history JSON,
    and a resume file written every epoch, so a killed run loses at most one epoch. With the EMA on
    (settings['ema_decay'] > 0) the EMA weights are validated and saved. Returns the history (one dict per
    epoch) and leaves the best weights loaded in `model`.
    """
    settings = run.settings
    trained_on = checkpoints.training_record(train_set[0])  # every checkpoint says which images its model trained on
    training = make_training(model, settings, steps_per_epoch(len(train_set[0]), settings["batch_size"]), run.seed)
    progress = checkpoints.restore_run(run, model, training)
    evaluated = training.evaluated(model)
    monitor = settings["monitor"]
    patience = math.inf if settings.get("budget") else settings["patience"]  # a budget's plan is the run
    while progress["epoch"] < settings["epochs"] and progress["stale_epochs"] < patience:
        progress["epoch"] += 1
        record = train_and_validate(model, (train_set, val_set), training, run, progress["epoch"])
        progress["history"].append(record)
        if is_better(record[monitor], progress["best"], monitor):
            progress.update(best=record[monitor], best_epoch=progress["epoch"], stale_epochs=0)
            checkpoints.save(run.checkpoint, checkpoints.checkpoint_dict(evaluated, record, settings, trained_on))
        else:
            progress["stale_epochs"] += 1
        checkpoints.save_epoch(run, model, training, progress)
        run.log(epoch_line(record, progress, training.ema is not None))
    if progress["stale_epochs"] >= patience:
        run.log(f"early stop: {monitor} did not improve for {patience} epochs")

    # Mark the best checkpoint complete, then drop the resume file: a run is finished only when both are done.
    finished = checkpoints.mark_complete(run.checkpoint)
    checkpoints.resume_path(run.checkpoint).unlink(missing_ok=True)
    model.load_state_dict(finished["model_state"])
    run.log(f"best epoch {progress['best_epoch']} ({monitor} {progress['best']:.4f}) saved to {run.checkpoint}")
    return progress["history"]


def train_and_validate(model, data_sets, training, run, epoch):
    """Epoch number `epoch` of training and its validation: the epoch's history record.

    data_sets: (train_set, val_set). With the EMA on, the EMA weights are validated, and the plain ones beside.
    """
    (train_set, val_set), settings = data_sets, run.settings
    evaluated = training.evaluated(model)
    start = time.perf_counter()
    first_step = training.scheduler.last_epoch  # LambdaLR's count of optimizer steps so far
    train_loss, train_acc, finite, seen = train_one_epoch(model, *train_set, training, settings)
    if not finite or not all_finite(model):
        raise cli.UserError(f"training diverged in epoch {epoch}: the loss or the weights became NaN or Inf "
                            f"(try a lower --lr); {run.checkpoint} is not marked complete")
    train_seconds = time.perf_counter() - start
    # the epoch's highest rate, not its first step's (a warm-up epoch starts at a small fraction of the peak),
    # from the schedule's own rule over the steps it just took
    scheduler = training.scheduler
    lr = scheduler.base_lrs[0] * max(scheduler.lr_lambdas[0](step) for step in range(first_step, scheduler.last_epoch))
    val_loss, val_acc = loss_and_accuracy(evaluated, *val_set, training.criterion, settings["normalization"],
                                          settings["precision"])
    record = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss,
              "val_accuracy": val_acc,
              "lr": lr, "seconds": time.perf_counter() - start, "images_per_second": seen / train_seconds}
    if training.ema is not None:  # what the EMA gains: the same epoch's plain weights
        record["raw_val_loss"], record["raw_val_accuracy"] = loss_and_accuracy(
            model, *val_set, training.criterion, settings["normalization"], settings["precision"])
    return record


def epoch_line(record, progress, with_ema):
    raw = f"  (plain weights {record['raw_val_accuracy']:.4f})" if with_ema else ""
    return (f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}{raw}  lr {record['lr']:.2e}  "
            f"{record['seconds']:.1f}s  {record['images_per_second']:.0f} img/s"
            + ("  *" if progress["best_epoch"] == record["epoch"] else ""))


def is_better(value, best, monitor):
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def all_finite(model):
    """True when every parameter and buffer is finite (read once per epoch)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in model_tensors(model) if t.is_floating_point()]).all())


def new_model(arch, device, seed):
    """A freshly initialised model on the device; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return data.place_model(build_model(arch), device)



# ----------------------------------------------------------------------------- pipeline A's command line and main

def parse_args(argv=None):
    parser = cli.Parser(__doc__)
    inputs = parser.add_argument_group("data")
    data.add_data_arguments(inputs, default="mnist", split="train")
    inputs.add_argument("--val-fraction", type=cli.fraction, default=RECIPE["val_fraction"],
                        help="stratified validation share of the training set")
    inputs.add_argument("--typefaces", type=cli.nonnegative_int, default=0,
                        help="add this many drawings of each digit in each training-half handwriting typeface "
                             "(typefaces.py; fetched with npm the first time) to the training set; 0: MNIST alone")
    inputs.add_argument("--no-test-report", action="store_true",
                        help="train and validate only, never reading the test set: for trials that choose a recipe "
                             "(the same command without it reuses the model and reports)")
    add_training_arguments(parser, RECIPE, parser.add_argument_group("model and length"))
    data.add_device_arguments(parser, training=True)
    files = parser.add_argument_group("files")
    files.add_argument("--checkpoint", help="best-model file; reused if complete (default: "
                                            f"{checkpoints.PIPELINE_A_CHECKPOINT}, or with --budget "
                                            "CNN_budget_<budget>.pth, so neither blocks the other)")
    files.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    args = resolve_training_arguments(data.resolve_data_arguments(parser.parse_args(argv)), RECIPE)
    if args.checkpoint is None:
        args.checkpoint = (f"CNN_budget_{cli.format_duration(args.budget)}.pth" if args.budget
                           else checkpoints.PIPELINE_A_CHECKPOINT)
    return args


def add_training_arguments(parser, recipe, model):
    """The training flags both pipelines share, in the groups a reader tunes by, with the pipeline's recipe as
    defaults; `model` is the script's "model and length" group, which gets the length flags after its own."""
    model.add_argument("--epochs", type=cli.positive_int,
                       help=f"the schedule's length (default: {recipe['epochs']}; not with --budget)")
    model.add_argument("--patience", type=cli.positive_int, default=recipe["patience"],
                       help="early stop after this many epochs without improvement")
    model.add_argument("--seed", type=cli.seed_int, default=recipe["seed"],
                       help="the seed of the split, the initial weights, the shuffling and the augmentation")
    group = parser.add_argument_group("optimizer")
    group.add_argument("--optimizer", choices=["adam", "adamw"], default=recipe["optimizer"])
    group.add_argument("--lr", type=cli.positive_float,
                       help=f"peak learning rate (default: {recipe['lr']}, with --budget {BUDGET_RECIPE['lr']})")
    group.add_argument("--batch-size", type=cli.positive_int, default=recipe["batch_size"])
    group.add_argument("--weight-decay", type=cli.nonnegative_float, default=recipe["weight_decay"],
                       help="AdamW's decoupled weight decay (not used by adam)")
    group = parser.add_argument_group("regularization")
    group.add_argument("--augmentation", choices=augmentation.AUGMENTATIONS, default=recipe["augmentation"])
    group.add_argument("--label-smoothing", type=cli.below_one, default=recipe["label_smoothing"])
    group.add_argument("--ema-decay", type=cli.below_one, default=recipe["ema_decay"],
                       help="the EMA of the weights: its decay per step (warmed up from 0.1); 0 turns it off")
    group = parser.add_argument_group("schedule")
    group.add_argument("--schedule", choices=SCHEDULE_SETTINGS,
                       help="step: x --lr-gamma every --lr-step epochs; cosine: cosine to 0 by epoch; "
                            "warmup-cosine, warmup-linear: linear warm-up over --warmup-epochs, then cosine or linear "
                            f"to 0 at the last step (default: {recipe['schedule']}; with --budget "
                            f"{BUDGET_RECIPE['schedule']}, and only these two)")
    group.add_argument("--lr-step", type=cli.positive_int, default=recipe["lr_step"],
                       help="step schedule: epochs between learning-rate cuts")
    group.add_argument("--lr-gamma", type=cli.positive_float, default=recipe["lr_gamma"],
                       help="step schedule: factor at each cut")
    group.add_argument("--warmup-epochs", type=cli.nonnegative_float, default=recipe["warmup_epochs"],
                       help="warmup-cosine and warmup-linear: warm-up length in epochs")
    group = parser.add_argument_group("time budget")
    group.add_argument("--budget", type=cli.duration,
                       help="train for this long instead of --epochs (90s, 10m, 2h): the run measures its speed, "
                            "then plans its steps")


def resolve_training_arguments(args, recipe):
    """Fill in --epochs, --schedule and --lr: the recipe's, or under --budget a schedule that ends at zero and a
    higher peak rate, which only such a schedule bears."""
    if args.budget is None:
        args.epochs = args.epochs or recipe["epochs"]
        args.schedule = args.schedule or recipe["schedule"]
        args.lr = args.lr or recipe["lr"]
        return args
    args.lr = args.lr or BUDGET_RECIPE["lr"]
    if args.epochs is not None:
        raise cli.UserError("--budget plans the number of steps itself; give --budget or --epochs, not both")
    if args.schedule not in (None, *BUDGET_SCHEDULES):
        raise cli.UserError(f"--schedule {args.schedule} does not end at zero on a planned step; "
                            f"with --budget use {' or '.join(BUDGET_SCHEDULES)} "
                            f"(the default is {BUDGET_RECIPE['schedule']})")
    args.schedule = args.schedule or BUDGET_RECIPE["schedule"]
    return args


def load_splits(args, device):
    """(train, val, test) as (uint8 images [N, 28, 28], int64 labels [N]) on the device, and the data's fingerprint.

    MNIST brings its own test set; a CSV gives up a stratified --val-fraction of its rows as the test set. With
    --no-test-report the test set is None: MNIST's test files are not read, and a CSV's test rows are still held
    out (so the run trains on what the same command without the flag trains on) but never scored.
    """
    images, labels = data.load_data(args, "train")
    test = None
    if args.data == "csv":
        kept, held_out = data.stratified_split(labels, args.val_fraction, args.seed)
        test = images[held_out], labels[held_out]
        images, labels = images[kept], labels[kept]
    elif not args.no_test_report:
        test = data.load_data(args, "test")
    train, val = data.stratified_split(labels, args.val_fraction, args.seed)
    test_set = None if args.no_test_report else data.subset_on_device(*test, torch.arange(len(test[1])), device)
    train_set = data.subset_on_device(images, labels, train, device)
    if args.typefaces:  # other hands beside MNIST's writers, for training only: validation stays MNIST's
        drawn = [t.to(device) for t in typefaces.training_digits(args.typefaces, args.seed)]
        train_set = tuple(torch.cat(pair) for pair in zip(train_set, drawn, strict=True))
    return (train_set, data.subset_on_device(images, labels, val, device), test_set,
            checkpoints.data_fingerprint(images, labels))


def main(argv=None):
    args = parse_args(argv)
    with training_session(args) as (device, precision, checkpoint):
        train_and_report(args, device, precision, checkpoint)


@contextlib.contextmanager
def training_session(args):
    """(device, precision, checkpoint path) for a training script's run, its outputs checked before any work and its
    checkpoint locked for the run's life (train_reader.py's main too)."""
    if args.use_deterministic_algorithms:
        data.use_deterministic_algorithms()
    device = data.pick_device(args.device)
    precision = data.pick_precision(args.precision, device)
    checkpoint = Path(args.checkpoint)
    cli.check_outputs({"--checkpoint": checkpoints.training_files(checkpoint)},
                      {"--train-csv": [args.train_csv] if args.data == "csv" else []})
    with checkpoints.checkpoint_lock(checkpoint):
        yield device, precision, checkpoint


def train_and_report(args, device, precision, checkpoint):
    existing = checkpoints.existing_checkpoint(checkpoint, args.retrain)
    # before the data is read
    if existing is not None and checkpoints.is_complete(existing) and existing["arch"] != "vgg":
        raise cli.UserError(f"{checkpoint} holds a {existing['arch']} model, not pipeline A's vgg; "
                            "pass another --checkpoint or --retrain")
    train_set, val_set, test_set, fingerprint = load_splits(args, device)
    settings, flags = training_settings(args, {"arch": "vgg", "data": fingerprint,
                                               "split": {"val_fraction": args.val_fraction},
                                               "monitor": "val_loss", "precision": precision})
    run = checkpoints.Run(checkpoint, settings, flags, seed=args.seed, retrain=args.retrain)
    tested = "no test set (--no-test-report)" if test_set is None else f"{len(test_set[0])} test images"
    print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; "
          f"{len(train_set[0])} train / {len(val_set[0])} val / {tested}")
    adopt_saved_plan(run, existing)
    finished = checkpoints.finished_checkpoint(run, existing)
    if finished is not None:
        model, normalization = reused_model(run, finished, device)
    else:
        started = time.perf_counter()
        if needs_plan(run):
            plan_budget([(run, (len(train_set[0]), len(val_set[0])), lambda: (train_set, val_set), 0)], device, started)
        model, normalization = train_new_model(run, device, train_set, val_set, started)
    if test_set is None:
        print(f"test set not read (--no-test-report); {checkpoint} is the model chosen by validation")
        return

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    test_loss, test_acc = loss_and_accuracy(model, *test_set, criterion, normalization, precision)
    errors = round((1 - test_acc) * len(test_set[0]))
    print(f"test loss {test_loss:.4f}  accuracy {test_acc:.4f} ({errors} errors in {len(test_set[0])} images)")


def train_new_model(run, device, train_set, val_set, started):
    """(model, normalization): a freshly initialised model trained by fit; the time since `started` is logged."""
    model = new_model(run.settings["arch"], device, run.seed)
    fit(model, train_set, val_set, run)
    run.log(f"training took {time.perf_counter() - started:.0f}s")
    return model, run.settings["normalization"]


def reused_model(run, finished, device):
    """(model, normalization) of the run's finished checkpoint (its contents: `finished`), said in one line."""
    model, _ = checkpoints.load_model(run.checkpoint, device, finished)
    run.log(f"using {run.checkpoint} (epoch {finished['epoch']}); --retrain to train again")
    return model, finished["normalization"]


def training_settings(args, run_of):
    """Everything that defines a training run, as plain values: the loop reads them, checkpoints record them.

    run_of: what the script says the run is of (arch, data fingerprint, split, monitor, precision); then the
    flags that act in the run (weight decay only for adamw, only this schedule's parameters), so changing a
    flag that does not act is not another run. Returns (settings, the names of those taken from flags).
    """
    budget = args.budget is not None  # then the plan sets the epochs, and early stopping does not act
    flags = ["seed", "optimizer", "lr", "schedule", *([] if budget else ["epochs"]), "batch_size", "label_smoothing",
             "augmentation", "ema_decay", *([] if budget else ["patience"]),
             *(["weight_decay"] if args.optimizer == "adamw" else []), *SCHEDULE_SETTINGS[args.schedule],
             *(["budget"] if budget else []), *(["typefaces"] if getattr(args, "typefaces", 0) else [])]
    settings = {**run_of, "normalization": dict(data.NORMALIZATION), **{name: getattr(args, name) for name in flags}}
    if budget:
        settings.update(planned_steps=None, epochs=None, patience=None)  # fixed by the plan (see plan_budget)
    return settings, frozenset(flags)



# ============================================================================= the budget planner
# Training to a time budget: with --budget a run measures its own speed on its first steps (after a warm-up, on this
# machine, at this precision), then fixes its number of optimizer steps so that training and its validation passes
# end within the budget, and its schedule reaches zero on that planned step. The plan becomes part of the run's
# settings, kept in <stem>.plan.json beside the checkpoint, so a rerun or a resume on any machine finishes the same
# plan.


PLAN_KEYS = ("planned_steps", "epochs")
WARMUP_STEPS, MEASURED_STEPS, MEASURED_ROUNDS = 3, 10, 3


def without_plan(settings):
    return {name: value for name, value in settings.items() if name not in PLAN_KEYS}


def needs_plan(run):
    """True for a budgeted run that has not fixed its number of steps yet."""
    return bool(run.settings.get("budget")) and run.settings["planned_steps"] is None


def adopt_saved_plan(run, existing):
    """A budgeted run without a plan takes the one it made before for these same settings: from its plan file, else
    from its checkpoint (`existing`: the file's contents, or None)."""
    if not needs_plan(run):
        return
    candidates = []
    if checkpoints.plan_path(run.checkpoint).exists() and not run.retrain:
        candidates.append(cli.read_json(checkpoints.plan_path(run.checkpoint)).get("settings"))
    if existing is not None:
        candidates.append(existing.get("settings"))
    for saved in candidates:
        if isinstance(saved, dict) and without_plan(saved) == without_plan(run.settings):
            run.settings.update({name: saved[name] for name in PLAN_KEYS})
            return


def plan_budget(jobs, device, started):
    """Fix the plan of every job so that all of them end within their --budget since `started` (perf_counter).

    jobs: [(run, (train images, validation images), data_sets, images predicted after training)], data_sets a
    function giving (train_set, val_set) on the device, called only for the job an architecture is measured on. Each
    architecture is measured once, on its first job, and every job gets the same number of steps, so the budget is
    shared by their measured cost (pipeline A: one job; train_kfold.py: a rank's unplanned jobs).
    """
    budget = jobs[0][0].settings["budget"]
    speeds, costs = {}, []
    for run, (train_count, val_count), data_sets, after_images in jobs:
        arch = run.settings["arch"]
        if arch not in speeds:
            speeds[arch] = measure_speed(run, device, *data_sets())
        step, epoch = measured_costs(speeds[arch], val_count, run.settings)
        costs.append((steps_per_epoch(train_count, run.settings["batch_size"]), step, epoch,
                      after_images * speeds[arch]["val_image_seconds"]))
    spent = time.perf_counter() - started
    planned = plan_steps(budget - spent, costs)
    if planned < 1:
        raise budget_error(budget, spent, sum(step + epoch + after for _, step, epoch, after in costs))
    for (run, *_), (per_epoch, *_) in zip(jobs, costs, strict=True):
        fix_plan(run, per_epoch, planned, speeds[run.settings["arch"]])


def measure_speed(run, device, train_set, val_set):
    """This run's cost on this machine: {seconds per step, per validation image, per epoch's file writes}.

    Measured on a scratch model, optimizer and generators (the run's own start is untouched): WARMUP_STEPS
    steps, then MEASURED_ROUNDS rounds of MEASURED_STEPS timed ones, with the run's batch size, augmentation,
    precision and EMA. A step costs what the fastest round took, as timeit reads its repeats: a slower round
    is other work on the machine for a moment, and a plan made from it would leave most of the budget unused.
    """
    settings = {**run.settings, "planned_steps": None, "epochs": 1}
    model = new_model(settings["arch"], device, run.seed)
    training = make_training(model, settings, steps=WARMUP_STEPS + MEASURED_ROUNDS * MEASURED_STEPS, seed=run.seed)
    batch = settings["batch_size"]
    cycled = torch.arange(batch * (WARMUP_STEPS + MEASURED_STEPS), device=device) % len(train_set[0])
    images, labels = train_set[0][cycled], train_set[1][cycled]
    train_one_epoch(model, images[:batch * WARMUP_STEPS], labels[:batch * WARMUP_STEPS], training, settings)
    rounds = []
    for _ in range(MEASURED_ROUNDS):
        start = time.perf_counter()
        train_one_epoch(model, images[batch * WARMUP_STEPS:], labels[batch * WARMUP_STEPS:], training, settings)
        rounds.append((time.perf_counter() - start) / MEASURED_STEPS)
    step = min(rounds)
    val_images, val_labels = val_set[0][:1024], val_set[1][:1024]
    loss_and_accuracy(model, val_images[:64], val_labels[:64], training.criterion, settings["normalization"],
                      settings["precision"])
    start = time.perf_counter()
    loss_and_accuracy(model, val_images, val_labels, training.criterion, settings["normalization"],
                      settings["precision"])
    per_image = (time.perf_counter() - start) / len(val_images)
    start = time.perf_counter()
    torch.save({"model": model.state_dict(), "optimizer": training.optimizer.state_dict()}, io.BytesIO())
    return {"step_seconds": step, "val_image_seconds": per_image, "save_seconds": 2 * (time.perf_counter() - start)}


def measured_costs(speed, val_count, settings):
    """(seconds per step, seconds per epoch besides its steps) of one job: validation (twice with the EMA) and saves."""
    passes = 2 if settings["ema_decay"] > 0 else 1
    return speed["step_seconds"], passes * val_count * speed["val_image_seconds"] + speed["save_seconds"]


def plan_steps(seconds, jobs):
    """The number of steps N that each of `jobs` trains so that all of them end within `seconds`.

    jobs: [(steps per epoch, seconds per step, seconds per epoch besides steps, seconds after training)]; every
    job gets the same N, and each of its ceil(N / steps per epoch) epochs is validated. 0 when even one step of
    each, with its validation, does not fit.
    """
    def total(n):
        return sum(n * step + math.ceil(n / per_epoch) * epoch + after for per_epoch, step, epoch, after in jobs)
    low, high = 0, max(1, int(seconds / sum(step for _, step, _, _ in jobs)) + 1)
    while low < high:  # the largest n with total(n) <= seconds; total grows with n
        middle = (low + high + 1) // 2
        low, high = (middle, high) if total(middle) <= seconds else (low, middle - 1)
    return low


def budget_error(budget, spent, needed):
    return cli.UserError(f"--budget {cli.format_duration(budget)} is too short for this run: measuring its speed took "
                         f"{spent:.0f}s "
                         f"and one step with one validation pass needs {needed:.1f}s more; give at least "
                         f"{cli.format_duration(math.ceil(1.5 * (spent + needed)))}")


def fix_plan(run, per_epoch, planned_steps, speed):
    """Record the plan (`per_epoch` steps an epoch) in the run's settings and its plan file, and say it in one line."""
    run.settings.update(planned_steps=planned_steps, epochs=math.ceil(planned_steps / per_epoch))
    cli.write_json(checkpoints.plan_path(run.checkpoint), {"settings": run.settings, "measured": speed})
    images_per_second = run.settings["batch_size"] / speed["step_seconds"]
    run.log(f"budget {cli.format_duration(run.settings['budget'])}: {planned_steps} steps = "
            f"{planned_steps / per_epoch:.2f} epochs, at {images_per_second:.0f} img/s measured "
            f"({run.settings['precision']}); {run.settings['schedule']} to 0 at step {planned_steps}")


if __name__ == "__main__":
    cli.run_cli(main)
