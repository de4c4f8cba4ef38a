"""Make the released model, weights/vgg_mnist.pth, and its manifest from a finished pipeline A checkpoint.

    python tools/release.py --checkpoint ~/runs/release/CNN_best_model.pth --data-dir ../shared/data \
        --commit 6d75e51 --training-seconds 1500 --command "python train_cnn.py ..."

The weights are stored in half precision (BatchNorm's running statistics stay fp32), after a parity check on
MNIST's 10,000 test images: the copy, loaded back into the fp32 model and predicted at fp32, must give every label
the fp32 checkpoint gives, and no probability may differ by more than 1e-3; otherwise nothing is written. The
manifest records the file's SHA-256 (checked whenever the file is loaded), how it was made, and its test accuracy.

    python tools/release.py --line-reader ~/runs/reader/seed42.pth --data-dir ../shared/data --commit 1234abc \
        --training-seconds 7000 --command "python train_reader.py ..."

adds a line reader (train_reader.py) to the released model instead, in fp32 as trained (in fp16 its GRU reads some
lines differently); the digit weights stay as they are, byte for byte, and so does every digit they read; the
manifest records the reader.
"""
import argparse
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path



sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
from predict_tta import DigitReader  # noqa: E402

TOLERANCE = 1e-3
KEPT_IN_FP32 = ("running_mean", "running_var")  # BatchNorm's statistics: small, and sensitive to rounding


def half_precision(state):
    """A state dict with its floating-point weights in fp16; BatchNorm's statistics and the rest as they are."""
    return {name: tensor.half() if tensor.is_floating_point() and not name.endswith(KEPT_IN_FP32) else tensor
            for name, tensor in state.items()}


def machine():
    """lscpu's model name and the instruction sets that decide the speed (AMX, AVX-512 BF16, AVX2)."""
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    flags = fields.get("Flags", "").split()
    kinds = [flag for flag in ("amx_bf16", "avx512_bf16", "avx2") if flag in flags]
    return f"{fields.get('Model name', platform.processor()).strip()} ({', '.join(kinds)}), {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the finished fp32 checkpoint of the release run")
    p.add_argument("--line-reader", help="instead, add this line reader (train_reader.py's finished checkpoint) to the "
                                         "released model")
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="folder holding MNIST/raw")
    p.add_argument("--command", required=True, help="the command that trained it")
    p.add_argument("--commit", required=True, help="the commit it was trained at")
    p.add_argument("--training-seconds", type=float, help="what its training took ('training took')")
    p.add_argument("--remark", default="",
                   help="anything a reader of the figures should know (e.g. other work beside it)")
    args = p.parse_args()
    if args.line_reader:
        return add_line_reader(args)
    if args.checkpoint is None or args.training_seconds is None:
        p.error("--checkpoint and --training-seconds are required (or --line-reader)")

    target = checkpoints.RELEASED_MODEL
    candidate = target.with_name("candidate.pth")
    cli.check_outputs({"weights/": [target, candidate, checkpoints.RELEASE_MANIFEST]},
                      {"--checkpoint": [args.checkpoint]})
    checkpoint = checkpoints.load(args.checkpoint)
    if not checkpoints.is_complete(checkpoint) or checkpoint["arch"] != "vgg" or "trained_on" not in checkpoint:
        sys.exit(f"{args.checkpoint}: not a finished vgg checkpoint with a record of its training images")
    images, labels = data.load_mnist(args.data_dir, "test")
    target.parent.mkdir(exist_ok=True)
    checkpoints.save(candidate, {**checkpoint, "model_state": half_precision(checkpoint["model_state"])})
    try:
        full = DigitReader(args.checkpoint, "cpu", "fp32").probabilities(images)
        half = DigitReader(candidate, "cpu", "fp32").probabilities(images)
    except BaseException:
        candidate.unlink()
        raise
    labels_differ = int((full.argmax(1) != half.argmax(1)).sum())
    difference = (full - half).abs().max().item()
    print(f"fp16 weights against fp32, both predicted at fp32 on {len(images)} MNIST test images: "
          f"{labels_differ} labels differ, largest probability difference {difference:.2e}")
    if labels_differ or difference > TOLERANCE:
        candidate.unlink()
        sys.exit(f"parity check failed (allowed: 0 labels, {TOLERANCE:.0e}); nothing written")
    accuracy = (half.argmax(1) == labels).float().mean().item()
    candidate.replace(target)
    manifest = {
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "bytes": target.stat().st_size,
        "arch": "vgg",
        "mnist_test_accuracy": round(accuracy, 4),
        "accuracy_read": "at --precision fp32 with no TTA after training, beside the run's own report (see remark); "
                         "neither chose anything",
        "command": args.command,
        "commit": args.commit,
        "machine": machine(),
        "training_seconds": round(args.training_seconds),
        **({"remark": args.remark} if args.remark else {}),
        "trained_on": f"{len(checkpoint['trained_on'])} of MNIST's training images (a stratified "
                      f"{checkpoint['settings']['split']['val_fraction']} held out for validation)",
        "precision": "fp16 weights, fp32 BatchNorm statistics; loaded into fp32",
        "parity": {"labels_differ": labels_differ, "max_probability_difference": float(f"{difference:.2e}"),
                   "images": len(images)},
        "versions": checkpoints.library_versions(),
        "note": "committed only here, replaced only when the recipe improves; every version stays in git's history",
    }
    cli.write_json(checkpoints.RELEASE_MANIFEST, manifest)
    print(f"wrote {target} ({manifest['bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256'][:16]}...), MNIST test "
          "accuracy "
          f"{accuracy:.4f}, and {checkpoints.RELEASE_MANIFEST}")


def add_line_reader(args):
    """The released model with the line reader added as it was trained, in fp32 (in fp16 its GRU read 8 of 2,000
    validation lines differently), its digit weights untouched; the pair detector of older releases dropped; the
    manifest updated."""
    from models import LINE_READER
    target, candidate = checkpoints.RELEASED_MODEL, checkpoints.RELEASED_MODEL.with_name("candidate.pth")
    cli.check_outputs({"weights/": [target, candidate, checkpoints.RELEASE_MANIFEST]},
                      {"--line-reader": [args.line_reader]})
    released, trained = checkpoints.load(target), checkpoints.load(args.line_reader)
    if not checkpoints.is_complete(trained) or trained["arch"] != LINE_READER:
        sys.exit(f"{args.line_reader}: not a finished line reader (train_reader.py); nothing written")
    kept = {name: value for name, value in released.items() if name != "pair_detector"}   # what the reader replaces
    checkpoints.save(candidate, {**kept, "line_reader": trained["model_state"]})
    try:
        checkpoints.load_line_reader(candidate, "cpu", checkpoints.load(candidate))      # it loads, or one line
    except BaseException:
        candidate.unlink()
        raise
    candidate.replace(target)
    manifest = cli.read_json(checkpoints.RELEASE_MANIFEST)
    manifest.update(sha256=hashlib.sha256(target.read_bytes()).hexdigest(), bytes=target.stat().st_size)
    manifest.pop("pair_detector", None)
    manifest["line_reader"] = {
        "what": "models.LineReader: reads each line of writing for --number (where its digits are, and which)",
        "command": args.command, "commit": args.commit, "machine": machine(),
        "training_seconds": round(args.training_seconds) if args.training_seconds else None,
        "epoch": trained["epoch"], "validation_lines_right": round(trained["metrics"]["val_accuracy"], 4),
        "validation_lines": trained["settings"]["val_lines"], "precision": "fp32, as trained",
        **({"remark": args.remark} if args.remark else {})}
    cli.write_json(checkpoints.RELEASE_MANIFEST, manifest)
    print(f"added the line reader to {target} ({manifest['bytes'] / 1e6:.1f} MB, sha256 "
          f"{manifest['sha256'][:16]}...) and {checkpoints.RELEASE_MANIFEST}")


if __name__ == "__main__":
    cli.run_cli(main)
