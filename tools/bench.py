"""Speed benchmark (`make bench`): our training epoch against the compute ceiling and the notebook-style loop.

For each architecture at one batch size, in one run on one machine:
  ceiling   forward + backward + optimizer step on one batch already on the device (project precision, and fp32)
  ours      train_cnn.train_one_epoch + loss_and_accuracy: slicing, on-device augmentation, the per-step schedule and
            EMA, bookkeeping, validation pass;
            measured in rounds alternating with the ceiling at the project precision, so both see the same load
  notebook  torchvision MNIST + per-sample PIL RandomAffine/ToTensor/Normalize in a DataLoader, fp32,
            best of num_workers 0, 1, 2
  inference plain prediction, and the TTA ensemble (2 architectures x --ensemble-folds x 4 variants)
Each kind of measurement runs in its own process and reports its peak RSS (ours includes the ceiling's extra model,
a few tens of MB). Prints a table, writes JSON.
This file is not collected by pytest (its name does not start with test_): speed is measured here, not asserted.

    python tools/bench.py --data-dir ../shared/data --out bench.json
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import augmentation  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import train_cnn  # noqa: E402
from models import build_model  # noqa: E402

ARCHS = ["vgg", "resnet", "widecnn"]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def new_model(arch, device):
    """A fresh model as training places it (the device, channels_last where that is faster)."""
    return data.place_model(build_model(arch), device).train()


# ----------------------------------------------------------------------------- the measurements (run in a child)

def ceiling_step(arch, precision, batch_size, device):
    """One forward + backward + Adam step on one resident, already-normalized batch: the ceiling's unit of work."""
    model = new_model(arch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        with data.autocast(device, precision):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: oneDNN picks its kernels on the first calls
        step()
    return step


def time_steps(step, steps, device):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


def measure_ceiling(arch, precision, batch_size, device, seconds=5.0):
    """Images/s of the ceiling step repeated for about `seconds`."""
    step = ceiling_step(arch, precision, batch_size, device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    synchronize(device)  # once at the end: a GPU keeps queueing steps, as in training
    return steps * batch_size / (time.perf_counter() - start)


def measure_training(arch, precision, batch_size, device, images_count, data_dir, rounds):
    """Our real epoch (training + validation pass) and the ceiling, interleaved in `rounds` in one process.

    A shared machine's speed drifts by 20% within minutes; measured apart, the two figures can disagree by that much
    in either direction. Alternating them puts the same drift on both, so their ratio holds. Each round is one of our
    epochs over images_count / rounds images, then half as many images of ceiling steps.
    """
    images, labels = data.load_mnist(data_dir, "train")
    train_images, train_labels = images[:images_count].to(device), labels[:images_count].to(device)
    val_count = images_count // 10
    val_images, val_labels = images[-val_count:].to(device), labels[-val_count:].to(device)
    model = train_cnn.new_model(arch, device, seed=0)
    settings = {"batch_size": batch_size, "precision": precision, "augmentation": "light", "optimizer": "adam",
                "lr": 1e-3, "schedule": "step", "lr_step": 10**6, "lr_gamma": 1.0, "label_smoothing": 0.1,
                # a constant rate, stepped every step as in training
                "ema_decay": 0.999, "normalization": data.NORMALIZATION}
    training = train_cnn.make_training(model, settings, train_cnn.steps_per_epoch(images_count, batch_size), seed=0)
    criterion, generators = training.criterion, training.generators

    def epoch(images, labels):
        train_cnn.train_one_epoch(model, images, labels, training, settings)

    epoch(train_images[:batch_size * 3], train_labels[:batch_size * 3])  # warm-up
    step = ceiling_step(arch, precision, batch_size, device)
    ours_seconds = train_seconds = ceiling_seconds = 0.0
    ceiling_steps = 0
    for round_ in range(rounds):
        part = slice(round_ * images_count // rounds, (round_ + 1) * images_count // rounds)
        val_part = slice(round_ * val_count // rounds, (round_ + 1) * val_count // rounds)
        start = time.perf_counter()
        epoch(train_images[part], train_labels[part])
        train_seconds += time.perf_counter() - start
        train_cnn.loss_and_accuracy(training.ema.module, val_images[val_part], val_labels[val_part], criterion,
                                    data.NORMALIZATION, precision)
        ours_seconds += time.perf_counter() - start
        steps = max(1, images_count // rounds // batch_size // 2)
        ceiling_seconds += time_steps(step, steps, device)
        ceiling_steps += steps
    augmentation = measure_augmentation(train_images, batch_size, generators["augment"])
    return {"images_per_second": images_count / ours_seconds,
            "train_only_images_per_second": images_count / train_seconds,
            "ceiling_images_per_second": ceiling_steps * batch_size / ceiling_seconds,
            "augmentation_share": augmentation / ours_seconds}


def measure_augmentation(images, batch_size, generator):
    """Seconds the light augmentation alone takes over one epoch of these images."""
    start = time.perf_counter()
    for index in data.batch_indices(len(images), batch_size):
        data.to_unit_float(images[index], augmentation.light_augmentation, generator)
    synchronize(images.device)
    return time.perf_counter() - start


def measure_notebook(arch, batch_size, images_count, data_dir, workers):
    """Images/s of the usual tutorial loop: PIL transforms per sample in a DataLoader, fp32, contiguous."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms
    transform = transforms.Compose([
        transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        transforms.ToTensor(),
        transforms.Normalize((data.MNIST_MEAN,), (data.MNIST_STD,)),
    ])
    dataset = Subset(datasets.MNIST(data_dir, train=True, download=True, transform=transform),
                     range(images_count + 2 * batch_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    model = build_model(arch).train()  # the notebook's plain model: contiguous layout, on the CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    seen, correct, start = 0, 0, None
    for step, (x, y) in enumerate(loader):
        if step == 2:  # the first batches pay for worker start-up
            seen, start = 0, time.perf_counter()
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.argmax(1) == y).sum().item()  # the usual per-batch bookkeeping
        seen += len(x)
    return seen / (time.perf_counter() - start)


def measure_inference(archs, precision, device, images_count, data_dir, folds):
    """Images/s of plain prediction (one vgg) and of the TTA ensemble (archs x folds models x 4 variants)."""
    from predict_tta import ensemble_probabilities
    images, _ = data.load_mnist(data_dir, "test")
    images = images[:images_count].to(device)
    plain = [(new_model("vgg", device).eval(), data.NORMALIZATION, "vgg")]
    ensemble = [(new_model(arch, device).eval(), data.NORMALIZATION, arch) for arch in archs for _ in range(folds)]
    results = {}
    for name, models, variants in (("plain", plain, augmentation.TTA_VARIANTS[:1]), ("tta_ensemble", ensemble,
                                                                                     augmentation.TTA_VARIANTS)):
        ensemble_probabilities(models, images[:256], variants, precision, seed=0)  # warm-up
        start = time.perf_counter()
        ensemble_probabilities(models, images, variants, precision, seed=0)
        seconds = time.perf_counter() - start
        passes = len(models) * len(variants)
        results[name] = {"models": len(models), "variants": len(variants), "images_per_second": images_count / seconds,
                         "forward_passes_per_second": images_count * passes / seconds}
    return results


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(args):
    """One measurement in this process; prints its result as JSON on the last line."""
    device = data.pick_device(args.device)
    torch.manual_seed(0)
    if args.child == "ceiling":
        result = {"images_per_second": measure_ceiling(args.arch, args.precision, args.batch_size, device)}
    elif args.child == "training":
        result = measure_training(args.arch, args.precision, args.batch_size, device, args.images, args.data_dir,
                                  args.rounds)
    elif args.child == "notebook":
        result = {"images_per_second": measure_notebook(args.arch, args.batch_size, args.notebook_images,
                                                        args.data_dir, args.workers)}
    else:
        result = measure_inference(["resnet", "widecnn"], args.precision, device, args.inference_images,
                                   args.data_dir, args.ensemble_folds)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ----------------------------------------------------------------------------- the driver

def run_child(args, kind, **options):
    command = [sys.executable, __file__, "--child", kind, "--data-dir", str(args.data_dir), "--device", args.device,
               "--batch-size", str(args.batch_size), "--images", str(args.images), "--rounds", str(args.rounds),
               "--notebook-images", str(args.notebook_images), "--inference-images", str(args.inference_images),
               "--ensemble-folds", str(args.ensemble_folds)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"benchmark step {kind} {options} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def scratch_copy_of_mnist(data_dir):
    """torchvision's MNIST extracts the .gz files beside them: give it a copy, not the shared folder."""
    for split in ("train", "test"):  # downloads the files when they are missing, and checks them
        data.load_mnist(data_dir, split)
    scratch = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    shutil.copytree(Path(data_dir) / "MNIST" / "raw", scratch / "MNIST" / "raw")
    return scratch


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_cpu": data.cpu_supports_bf16(), "torch": str(torch.__version__), "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def print_table(report):
    precision = report["precision"]
    print(f"\nbatch {report['batch_size']}, {report['images']} images per epoch, precision {precision}; "
          f"{report['machine']['cpu']}, {report['machine']['torch_threads']} threads\n")
    print(f"| arch | ceiling {precision} img/s | ceiling fp32 img/s | ours img/s | notebook img/s (workers) "
          f"| ours / ceiling | ours / notebook | augmentation share | peak RSS ours / notebook MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch, row in report["architectures"].items():
        print(f"| {arch} | {row['ceiling']:.0f} | {row['ceiling_fp32']:.0f} | {row['ours']:.0f} "
              f"| {row['notebook']:.0f} ({row['notebook_workers']}) | {row['ours_over_ceiling']:.2f} "
              f"| {row['ours_over_notebook']:.2f} | {100 * row['augmentation_share']:.1f}% "
              f"| {row['peak_rss_mb_ours']:.0f} / {row['peak_rss_mb_notebook']:.0f} |")
    inference = report["inference"]
    plain, tta = inference["plain"], inference["tta_ensemble"]
    print(f"\ninference on {report['inference_images']} images: plain vgg {plain['images_per_second']:.0f} img/s; "
          f"TTA ensemble ({tta['models']} models x {tta['variants']} variants) {tta['images_per_second']:.1f} img/s "
          f"= {tta['forward_passes_per_second']:.0f} forward passes/s; peak RSS {inference['peak_rss_mb']:.0f} MB")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="folder holding MNIST/raw (env MNIST_DATA_DIR)")
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=ARCHS)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=12_800, help="training images in our measured epoch")
    p.add_argument("--rounds", type=int, default=4, help="our epoch and the ceiling alternate this many times")
    p.add_argument("--notebook-images", type=int, default=1_280,
                   help="training images per notebook-style measurement (after 2 warm-up batches)")
    p.add_argument("--inference-images", type=int, default=1_024)
    p.add_argument("--ensemble-folds", type=int, default=5, help="models per architecture in the TTA ensemble")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--child", choices=["ceiling", "training", "notebook", "inference"], help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.child:
        return child(args)
    device = data.pick_device(args.device)
    precision = data.pick_precision("auto", device)
    args.data_dir = scratch_copy_of_mnist(args.data_dir)
    start = time.perf_counter()
    report = {"machine": machine_description(), "batch_size": args.batch_size, "images": args.images,
              "precision": precision, "device": str(device), "inference_images": args.inference_images,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "architectures": {}}
    try:
        for arch in args.archs:
            print(f"{arch}: our epoch alternating with the ceiling", flush=True)
            ours = run_child(args, "training", arch=arch, precision=precision)
            print(f"{arch}: fp32 ceiling", flush=True)
            ceiling_fp32 = run_child(args, "ceiling", arch=arch, precision="fp32")
            print(f"{arch}: notebook-style loop, workers 0, 1, 2", flush=True)
            notebook = {w: run_child(args, "notebook", arch=arch, workers=w) for w in (0, 1, 2)}
            best = max(notebook, key=lambda w: notebook[w]["images_per_second"])
            report["architectures"][arch] = {
                "ceiling": ours["ceiling_images_per_second"], "ceiling_fp32": ceiling_fp32["images_per_second"],
                "ours": ours["images_per_second"], "ours_train_only": ours["train_only_images_per_second"],
                "augmentation_share": ours["augmentation_share"],
                "notebook": notebook[best]["images_per_second"], "notebook_workers": best,
                "notebook_by_workers": {w: r["images_per_second"] for w, r in notebook.items()},
                "ours_over_ceiling": ours["images_per_second"] / ours["ceiling_images_per_second"],
                "ours_over_notebook": ours["images_per_second"] / notebook[best]["images_per_second"],
                "peak_rss_mb_ours": ours["peak_rss_mb"], "peak_rss_mb_notebook": notebook[best]["peak_rss_mb"],
            }
        print("inference", flush=True)
        report["inference"] = run_child(args, "inference", precision=precision)
    finally:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - start
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    cli.run_cli(main)
