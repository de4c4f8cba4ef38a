"""The line reader: a CRNN (models.LineReader) that reads a line of handwritten digits, trained with CTC.

The recipe, RECIPE below (each value is a flag)
    model         models.LineReader: a 16-32-64 channel trunk over the line at 32 px tall, a bidirectional GRU of 64
                  over its columns, one frame per 4 columns, 11 classes (CTC's blank and the ten digits)
    data          lines made on the fly (writing.digit_lines): 1-10 digits, spaced from overlapping by a third of a
                  digit to wide apart, each at its own height and baseline, turned, the line slanted, then pen, focus,
                  faint ink, noise, specks and stray pieces of ruled line. Their digits: the MNIST training digits
                  the released model trained on (its split: a stratified 10% held out with seed 42; the held-out
                  digits make the validation lines) and --typefaces N drawings of each digit in each training-half
                  handwriting typeface
    optimizer     AdamW, peak rate 2e-3, weight decay 1e-4, batches of 64 lines, gradients clipped at norm 5
    schedule      warmup-linear: up over the first half epoch, then linear to zero at the last step; --epochs of
                  --steps steps each
    EMA           of the weights, decay 0.999: validated, saved and released
Validation: --val-lines lines of the held-out digits, the same every epoch; the best epoch by whole lines read right
(greedy decoding) is kept. The released model's reader is this recipe with --typefaces 20 (tools/release.py
--line-reader adds it); how it reads photographed numbers: the README (Whole numbers).

    python train_reader.py --data-dir ../shared/data --checkpoint reader.pth --typefaces 20
    python train_reader.py --epochs 1 --steps 20 --val-lines 64 --checkpoint /tmp/r.pth   # a quick smoke run

A run resumes where it stopped (the same command), exactly, as pipeline A's does: the files beside its checkpoint
are checkpoints.py's; the optimizer, schedule and EMA are train_cnn.py's.
"""
import math
import time

import torch
import torch.nn.functional as F

import checkpoints
import cli
import data
import train_cnn
import typefaces
import writing
from models import LINE_READER, LineReader, count_parameters

RECIPE = {"epochs": 24, "steps": 800, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 0.5,
          "ema_decay": 0.999, "clip": 5.0, "seed": 42, "val_lines": 2000}
RELEASED_SPLIT = {"val_fraction": 0.1, "seed": 42}   # the released model's: its training digits, its validation digits


# ----------------------------------------------------------------------------- the digits the lines are made of

def digit_pools(args):
    """((images uint8 [N, 28, 28], labels [N]) that training lines are made of, the same for validation lines)."""
    images, labels = data.load_data(args, "train")
    train, val = data.stratified_split(labels, RELEASED_SPLIT["val_fraction"], RELEASED_SPLIT["seed"])
    pool = [(images[train], labels[train])]
    if args.typefaces:
        pool.append(typefaces.training_digits(args.typefaces, args.seed))
    return tuple(torch.cat(part) for part in zip(*pool, strict=True)), (images[val], labels[val])


def validation_lines(val_pool, count, seed, batch_size):
    """The validation lines, made once: [(lines, digits, lengths, widths)] in batches."""
    generator = torch.Generator().manual_seed(seed + 3)
    return [writing.digit_lines(*val_pool, min(batch_size, count - start), generator)
            for start in range(0, count, batch_size)]


# ----------------------------------------------------------------------------- the step and the validation

def line_logits(model, lines, precision):
    """The reader's logits [B, T, 11] for lines float [B, 1, 32, W] on the model's device."""
    with data.autocast(lines.device, precision):
        return model(lines)


def ctc_loss(logits, digits, lengths, widths):
    """The mean CTC loss per line of a batch, from its logits [B, T, 11]."""
    log_probs = F.log_softmax(logits.float(), -1).transpose(0, 1)          # [T, B, 11], as ctc_loss takes it
    frames = torch.div(widths, LineReader.STRIDE, rounding_mode="floor").clamp(max=log_probs.shape[0])
    return F.ctc_loss(log_probs, digits + 1, frames, lengths, blank=0, reduction="mean", zero_infinity=True)


def train_one_epoch(model, pool, training, settings):
    """settings['steps'] steps, each on a fresh batch of lines: (mean loss, finite, lines seen)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum, finite = torch.zeros((), device=device), torch.ones((), device=device, dtype=torch.bool)
    progress = data.progress_bar(settings["steps"], "train")
    for _ in range(settings["steps"]):
        lines, digits, lengths, widths = writing.digit_lines(*pool, settings["batch_size"],
                                                             training.generators["lines"])
        loss = ctc_loss(line_logits(model, lines.to(device), settings["precision"]), digits.to(device), lengths,
                        widths)
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.unscale_(training.optimizer)                        # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["clip"])
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.scheduler.step()
        training.ema.update(model)
        finite &= torch.isfinite(loss.detach())
        loss_sum += loss.detach()
        progress.update()
    progress.close()
    return loss_sum.item() / settings["steps"], bool(finite), settings["steps"] * settings["batch_size"]


@torch.inference_mode()
def validate(model, batches, precision):
    """(mean CTC loss, share of lines read whole and right, share of digits wrong: edit distance over digits)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = right = errors = digits_total = lines_total = 0
    for lines, digits, lengths, widths in batches:
        logits = line_logits(model, lines.to(device), precision)
        loss_sum += ctc_loss(logits, digits.to(device), lengths, widths).item() * len(lines)
        truths = torch.split(digits, lengths.tolist())
        for k, read in enumerate(LineReader.decode(logits.float().cpu(), widths)):
            truth = truths[k].tolist()
            said = [digit for digit, _, _ in read]
            right += said == truth
            errors += edit_distance(said, truth)
        digits_total += len(digits)
        lines_total += len(lines)
    return loss_sum / lines_total, right / lines_total, errors / digits_total


def edit_distance(a, b):
    """Levenshtein distance between two sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


# ----------------------------------------------------------------------------- fit

def make_training(model, settings, seed):
    """The optimizer (AdamW), the warmup-linear schedule over all steps, the EMA and the generators of a new run."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    return train_cnn.Training(
        optimizer=optimizer, scheduler=train_cnn.make_schedule(optimizer, settings, settings["steps"]),
        criterion=None, scaler=torch.amp.GradScaler(device.type, enabled=settings["precision"] == "fp16"),
        generators={"lines": torch.Generator().manual_seed(seed + 1)},
        ema=train_cnn.EMA(model, settings["ema_decay"]))


def fit(model, pool, val_batches, run):
    """Train for the run's epochs; the best EMA weights by whole validation lines read right are kept, marked complete
    at the end; a resume file after every epoch. Returns the history."""
    settings = run.settings
    trained_on = checkpoints.training_record(pool[0])
    training = make_training(model, settings, run.seed)
    progress = checkpoints.restore_run(run, model, training)
    while progress["epoch"] < settings["epochs"]:
        progress["epoch"] += 1
        start = time.perf_counter()
        train_loss, finite, seen = train_one_epoch(model, pool, training, settings)
        if not finite or not train_cnn.all_finite(model):
            raise cli.UserError(f"training diverged in epoch {progress['epoch']} (try a lower --lr); "
                                f"{run.checkpoint} is not marked complete")
        train_seconds = time.perf_counter() - start
        val_loss, val_accuracy, digit_errors = validate(training.ema.module, val_batches, settings["precision"])
        record = {"epoch": progress["epoch"], "train_loss": train_loss, "val_loss": val_loss,
                  "val_accuracy": val_accuracy, "val_digit_errors": digit_errors,
                  "lr": training.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start,
                  "lines_per_second": seen / train_seconds}
        progress["history"].append(record)
        if train_cnn.is_better(val_accuracy, progress["best"], "val_accuracy"):
            progress.update(best=val_accuracy, best_epoch=progress["epoch"])
            checkpoints.save(run.checkpoint, checkpoints.checkpoint_dict(training.ema.module, record, settings,
                                                                          trained_on))
        checkpoints.save_epoch(run, model, training, progress)
        best = "  *" if progress["best_epoch"] == record["epoch"] else ""
        run.log(f"epoch {record['epoch']:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  lines right "
                f"{val_accuracy:.4f}  digit errors {digit_errors:.4f}  lr {record['lr']:.2e}  "
                f"{record['seconds']:.0f}s {record['lines_per_second']:.0f} lines/s{best}")
    finished = checkpoints.mark_complete(run.checkpoint)
    checkpoints.resume_path(run.checkpoint).unlink(missing_ok=True)
    model.load_state_dict(finished["model_state"])
    run.log(f"best epoch {progress['best_epoch']} (lines right {progress['best']:.4f}) saved to {run.checkpoint}")
    return progress["history"]


# ----------------------------------------------------------------------------- command line and main

def parse_args(argv=None):
    parser = cli.Parser(__doc__)
    inputs = parser.add_argument_group("data")
    data.add_data_arguments(inputs, default="mnist", split="train")
    inputs.add_argument("--typefaces", type=cli.nonnegative_int, default=0,
                        help="add this many drawings of each digit in each training-half handwriting typeface "
                             "(typefaces.py) to the digits lines are made of")
    inputs.add_argument("--val-lines", type=cli.positive_int, default=RECIPE["val_lines"])
    group = parser.add_argument_group("model and length")
    group.add_argument("--epochs", type=cli.positive_int, default=RECIPE["epochs"])
    group.add_argument("--steps", type=cli.positive_int, default=RECIPE["steps"], help="steps per epoch")
    group.add_argument("--seed", type=cli.seed_int, default=RECIPE["seed"],
                       help="the initial weights and the lines (the split is the released model's)")
    group = parser.add_argument_group("optimizer")
    group.add_argument("--lr", type=cli.positive_float, default=RECIPE["lr"], help="peak learning rate")
    group.add_argument("--batch-size", type=cli.positive_int, default=RECIPE["batch_size"], help="lines per step")
    group.add_argument("--weight-decay", type=cli.nonnegative_float, default=RECIPE["weight_decay"])
    group.add_argument("--clip", type=cli.positive_float, default=RECIPE["clip"], help="gradient norm clipped to")
    group = parser.add_argument_group("schedule and EMA")
    group.add_argument("--warmup-epochs", type=cli.nonnegative_float, default=RECIPE["warmup_epochs"])
    group.add_argument("--ema-decay", type=cli.below_one, default=RECIPE["ema_decay"])
    data.add_device_arguments(parser, training=True)
    files = parser.add_argument_group("files")
    files.add_argument("--checkpoint", default="line_reader.pth", help="best-model file; reused if complete")
    files.add_argument("--retrain", action="store_true", help="train even if the checkpoint exists")
    args = parser.parse_args(argv)
    data.resolve_data_arguments(args)
    return args


FLAGS = ("epochs", "steps", "seed", "lr", "batch_size", "weight_decay", "clip", "warmup_epochs", "ema_decay",
         "typefaces", "val_lines")


def main(argv=None):
    args = parse_args(argv)
    with train_cnn.training_session(args) as (device, precision, checkpoint):
        existing = checkpoints.existing_checkpoint(checkpoint, args.retrain)
        pool, val_pool = digit_pools(args)
        settings = {"arch": LINE_READER, "data": checkpoints.data_fingerprint(*pool), "split": RELEASED_SPLIT,
                    "monitor": "val_accuracy", "precision": precision, "schedule": "warmup-linear",
                    "normalization": {"mean": 0.0, "std": 1.0},
                    **{name: getattr(args, name) for name in FLAGS}}
        run = checkpoints.Run(checkpoint, settings, frozenset(FLAGS), seed=args.seed, retrain=args.retrain)
        if checkpoints.finished_checkpoint(run, existing) is not None:
            print(f"{checkpoint} is finished (epoch {existing['epoch']}, lines right "
                  f"{existing['metrics']['val_accuracy']:.4f}); --retrain to train again")
            return
        torch.manual_seed(args.seed)
        model = data.place_model(LineReader(), device)
        print(f"device {device}, precision {precision}, {torch.get_num_threads()} threads; lines of "
              f"{len(pool[0])} digits, validation: {args.val_lines} lines of {len(val_pool[0])} held-out digits; "
              f"{count_parameters(model):,} parameters, {args.epochs} x {args.steps} steps of {args.batch_size}")
        val_batches = validation_lines(val_pool, args.val_lines, args.seed, args.batch_size)
        started = time.perf_counter()
        fit(model, pool, val_batches, run)
        print(f"trained in {math.ceil(time.perf_counter() - started)} s")


if __name__ == "__main__":
    cli.run_cli(main)
