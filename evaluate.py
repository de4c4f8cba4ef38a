"""The evaluation report: metrics and pictures for a model, an ensemble, or a submission file.

    python evaluate.py                                               # CNN_best_model.pth, else the released model
    python evaluate.py --weights CNN_best_model.pth                  # MNIST test set -> reports/CNN_best_model/
    python evaluate.py --weights models --tta 4                      # the k-fold ensemble with TTA
    python evaluate.py --test-csv labelled.csv --weights models      # a labelled Kaggle-format CSV (or --labels)
    python evaluate.py --submission submission.csv --labels test_labels.csv   # score a submission file

Writes confusion_matrix.png, misclassified.png, curves.png (from the history JSON beside each checkpoint),
metrics.json and predictions.csv. Inference is predict_tta.py's, so the numbers are the submission's. When a model
trained on some of the images it is scored on (its checkpoint's record says so), the report says how many and marks
every accuracy in it as not a fair score. In this file: the metrics, the figures, scoring a submission and a
model, main; below one banner, reading the histories and naming the report's files.
"""
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from sklearn.metrics import classification_report, confusion_matrix

import checkpoints
import cli
import data
from predict_tta import DigitReader, add_reader_arguments, default_weights, say_trained_on

plt.switch_backend("Agg")  # headless: figures go to files, never to a window
DPI = 120
DIGITS = list(range(10))


# ----------------------------------------------------------------------------- metrics

def compute_metrics(labels, predicted, probs=None, top=10):
    """Everything the report prints, as plain types: accuracy, errors, per-class report, confusions, loss."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    matrix = confusion_matrix(labels, predicted, labels=DIGITS)
    off_diagonal = [(int(matrix[t, p]), t, p) for t in DIGITS for p in DIGITS if t != p and matrix[t, p] > 0]
    off_diagonal.sort(key=lambda item: (-item[0], item[1], item[2]))
    metrics = {
        "images": int(len(labels)),
        "accuracy": float((labels == predicted).mean()),
        "errors": int((labels != predicted).sum()),
        "per_class": classification_report(labels, predicted, labels=DIGITS, digits=4, output_dict=True,
                                           zero_division=0),
        "top_confusions": [{"true": t, "predicted": p, "count": n} for n, t, p in off_diagonal[:top]],
        "confusion_matrix": matrix.tolist(),
    }
    if probs is not None:  # negative log-likelihood of the averaged probabilities
        true_probs = np.asarray(probs)[np.arange(len(labels)), labels]
        metrics["loss"] = float(-np.log(np.clip(true_probs, 1e-12, None)).mean())
    return metrics


def print_metrics(metrics, labels, predicted, unfair=""):
    loss = f"  loss {metrics['loss']:.4f}" if "loss" in metrics else ""
    print(f"accuracy {metrics['accuracy']:.4f}{loss}  errors {metrics['errors']} of {metrics['images']}{unfair}")
    print(classification_report(labels, predicted, labels=DIGITS, digits=4, zero_division=0))
    confusions = ", ".join(f"{c['true']}→{c['predicted']}: {c['count']}" for c in metrics["top_confusions"])
    print(f"most frequent confusions (true→predicted): {confusions or 'none'}")


# ----------------------------------------------------------------------------- figures

def marked(title, unfair):
    """A figure's title, and a second line saying it is not a fair score when `unfair` (say_trained_on's mark) is."""
    return f"{title}\n{unfair.strip(' ()')}" if unfair else title


def save_figure(figure, path):
    with cli.atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(figure)


def plot_confusion_matrix(matrix, accuracy, path, unfair=""):
    """Counts in every cell; a log colour scale so that a handful of errors shows beside thousands of hits."""
    matrix = np.asarray(matrix)
    figure, ax = plt.subplots(figsize=(7.5, 6.5))
    shown = np.ma.masked_equal(matrix, 0)
    image = ax.imshow(shown, cmap="Blues", norm=LogNorm(vmin=1, vmax=max(2, matrix.max())))
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images (log scale)")
    threshold = np.sqrt(max(2, matrix.max()))  # the middle of the log scale: dark cells get white text
    for t in DIGITS:
        for p in DIGITS:
            if matrix[t, p]:
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[t, p] > threshold else "black")
    ax.set_xticks(DIGITS)
    ax.set_yticks(DIGITS)
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(marked(f"Confusion matrix: accuracy {accuracy:.4f} ({matrix.sum() - np.trace(matrix)} errors of "
                        f"{matrix.sum()})", unfair))
    save_figure(figure, path)


def plot_misclassified(images, labels, predicted, confidence, path, max_errors, unfair=""):
    """The wrong images, most confident mistakes first, dark ink on white paper, each titled true/pred/confidence."""
    wrong = np.flatnonzero(labels != predicted)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:max_errors]
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.65 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):  # more axes than errors
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255)
        ax.set_title(f"true {labels[i]} pred {predicted[i]}\n{confidence[i]:.2f}", fontsize=8)
    total = int((labels != predicted).sum())
    title = (f"Misclassified: {len(wrong)} of {total} errors, most confident first" if total
             else "No misclassified images")
    figure.suptitle(marked(title, unfair), fontsize=11)
    figure.tight_layout()
    save_figure(figure, path)


def plot_curves(histories, path):
    """Loss and accuracy per epoch; train dashed, validation solid, one colour per checkpoint (e.g. per fold)."""
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.cm.tab10.colors
    for k, (name, history) in enumerate(histories.items()):
        epochs = [h["epoch"] for h in history]
        colour = colours[k % len(colours)]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot(epochs, [h[f"train_{key}"] for h in history], "--", color=colour, alpha=0.7, label=f"{name} train")
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "-", marker="o", markersize=3, color=colour,
                    label=f"{name} validation")
    # Accuracies near 1 are what tell models apart: the axis starts just below the lowest validation accuracy,
    # so the first training epochs may fall below it.
    lowest = min(h["val_accuracy"] for history in histories.values() for h in history)
    acc_ax.set_ylim(max(0.0, lowest - 0.25 * (1 - lowest)), 1.0)
    for ax, title in ((loss_ax, "Loss (with label smoothing)"),
                      (acc_ax, "Accuracy (from the lowest validation value)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.set_ylabel("cross-entropy")
    acc_ax.set_ylabel("accuracy")
    handles, names = acc_ax.get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    figure.tight_layout(rect=(0, 0.06 + 0.03 * (len(names) // 4), 1, 1))
    save_figure(figure, path)


# ----------------------------------------------------------------------------- scoring a submission or models, and main

def score_submission(args, out):
    """Format-check a submission against its answer key and report its metrics."""
    truth = data.load_submission_csv(args.labels)
    predicted = data.load_submission_csv(args.submission, len(truth))
    metrics = compute_metrics(truth.numpy(), predicted.numpy())
    print_metrics(metrics, truth.numpy(), predicted.numpy())
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["accuracy"], out / "confusion_matrix.png")
    cli.write_json(out / "metrics.json", {"submission": str(args.submission), "labels": str(args.labels), **metrics})


def evaluate_models(args, out):
    reader = DigitReader(args.weights, args.device, args.precision, args.tta, args.seed, args.batch_size)
    histories = load_histories(reader.paths)  # read before any file is written
    images, labels = data.load_data(args, "test")
    source = args.test_csv if args.data == "csv" else "MNIST test set"
    if labels is None:
        raise cli.UserError(f"{args.test_csv}: no labels to evaluate against; give a CSV with a label column, or "
                            "--labels")
    print(f"{len(reader.ensemble)} models x {len(reader.variants)} TTA variants on {len(images)} images "
          f"({source}); device {reader.device}, precision {reader.precision}")
    trained_on = reader.trained_on(images)
    unfair = say_trained_on(trained_on, len(reader.ensemble))
    probs = reader.probabilities(images).numpy()
    labels, predicted, confidence = labels.numpy(), probs.argmax(1), probs.max(1)
    metrics = compute_metrics(labels, predicted, probs)
    print_metrics(metrics, labels, predicted, unfair)

    plot_confusion_matrix(metrics["confusion_matrix"], metrics["accuracy"], out / "confusion_matrix.png", unfair)
    plot_misclassified(images.numpy(), labels, predicted, confidence, out / "misclassified.png", args.max_errors,
                       unfair)
    if histories:
        plot_curves(histories, out / "curves.png")
    else:
        print("no history JSON beside the checkpoints: curves.png not written")
    write_predictions(out / "predictions.csv", labels, predicted, confidence)
    cli.write_json(out / "metrics.json", {"weights": [str(path) for path in reader.paths],
                                          "tta_variants": len(reader.variants),
                                          "data": str(source), "fair_score": not unfair, "trained_on": trained_on,
                                          **metrics})


def main(argv=None):
    args = parse_args(argv)
    if args.weights is None and not args.submission:
        args.weights = [default_weights()]
    out = Path(args.out) if args.out else default_out(args)
    cli.check_output_folder("--out", out)
    inputs = {"--labels": [args.labels]}
    if args.submission:
        inputs["--submission"] = [args.submission]
    else:
        inputs.update({"--weights": checkpoints.checkpoint_files(args.weights),
                       "--test-csv": [args.test_csv] if args.data == "csv" else []})
    cli.check_outputs({"--out": [out / name for name in REPORT_FILES]}, inputs)
    if args.submission:
        score_submission(args, out)
    else:
        evaluate_models(args, out)
    print(f"report written to {out}/")


def parse_args(argv=None):
    parser = cli.Parser(__doc__)
    inputs = parser.add_argument_group("data")
    data.add_data_arguments(inputs, default="mnist", split="test")
    inputs.add_argument("--submission",
                        help="score this submission file (ImageId,Label) against --labels; no model needed")
    add_reader_arguments(parser, tta=1,
                         weights=f"{checkpoints.PIPELINE_A_CHECKPOINT} when it is here, else the released model")
    report = parser.add_argument_group("files")
    report.add_argument("--out", help="report folder (default: reports/<weights or submission name>/)")
    report.add_argument("--max-errors", type=cli.positive_int, default=48, help="most misclassified images to show")
    data.add_device_arguments(parser)
    args = data.resolve_data_arguments(parser.parse_args(argv))
    if args.submission and not args.labels:
        parser.error("--submission needs --labels")
    return args


# ============================================================================= machinery
# Below: the histories beside the checkpoints, read and checked, and the report's files.


def load_histories(paths):
    """{checkpoint name: history} for every checkpoint that has a history JSON beside it, each checked."""
    histories = {}
    for path in paths:
        json_path = checkpoints.history_path(path)
        if not json_path.is_file():
            continue
        history = cli.read_json(json_path, "a readable history", "move it away to report without curves")
        keys = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
        if not (isinstance(history, list) and history and all(isinstance(h, dict) and all(
                isinstance(h.get(k), (int, float)) for k in keys) for h in history)):
            raise cli.UserError(f"{json_path}: not a history of this project (a list of epochs with {', '.join(keys)})")
        histories[Path(path).stem] = history
    return histories


def default_out(args):
    if args.submission:
        return Path("reports") / Path(args.submission).stem
    if len(args.weights) == 1:
        return Path("reports") / Path(args.weights[0]).stem
    return Path("reports") / "ensemble"


def write_predictions(path, labels, predicted, confidence):
    cli.write_frame(path, pd.DataFrame({"index": np.arange(len(labels)), "true": labels, "predicted": predicted,
                                        "confidence": np.round(confidence, 6)}))


REPORT_FILES = ("confusion_matrix.png", "misclassified.png", "curves.png", "predictions.csv", "metrics.json")


if __name__ == "__main__":
    cli.run_cli(main)
