"""A GPU's first run (`make gpu-check`): the project's device paths on a real CUDA machine, in about 4 minutes.

Stages, each written to OUT/gpu_check.json as soon as it ends (a run cut short still reports what it reached),
with the output of every command it runs in OUT/gpu_check.log:
  device         GPU name, compute capability, memory, torch and CUDA versions, the precision `auto` picks
  bench          tools/bench.py's epoch against the compute ceiling, per architecture (img/s)
  sync           one training epoch (auto precision and fp16) and one TTA pass with torch.cuda.set_sync_debug_mode
                 "warn" inside their batch loops: the warnings are counted (the code's promise: 0)
  pipeline_a     train_cnn.py for 2 epochs in the auto precision and in fp16 (the gradient scaler): test accuracy, time
  pipeline_b     train_kfold.py, fold 0 of resnet and widecnn for 1 epoch, then predict_tta.py with 4 TTA variants
  torchrun       train_kfold.py under torchrun, one process on the GPU (cuda:LOCAL_RANK)
  deterministic  two runs of train_cnn.py (4 epochs) with --use-deterministic-algorithms: the same weights bit for bit?
  resume         the same run killed after its first epoch, run again: resumed, and equal to the first, uninterrupted?

    make gpu-check PYTHON=python3                     # on the GPU machine, MNIST's .gz files in data/MNIST/raw
    python tools/gpu_check.py --device cpu --limit 120 --out /tmp/check   # the same logic on a CPU (the test runs this)
"""
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import augmentation  # noqa: E402
import checkpoints  # noqa: E402
import cli  # noqa: E402
import bench  # noqa: E402
import data  # noqa: E402
import predict_tta  # noqa: E402
import train_cnn  # noqa: E402

STAGES = ["device", "bench", "sync", "pipeline_a", "pipeline_b", "torchrun", "deterministic", "resume"]


class Check:
    """The report being built, its log, and the scripts' common flags."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "stages": {}}
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.deadline = time.monotonic() + args.time_limit
        self.device = None  # set by the device stage; the others need it

    def save(self):
        cli.write_json(self.out / "gpu_check.json", self.report)

    def log(self, text):
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def limit(self, default=None):
        """--limit N for the scripts: the check's own --limit, else `default` (None: the whole data set)."""
        value = self.args.limit or default
        return ["--limit", str(value)] if value else []

    def script(self, *command, timeout=120):
        """Run a project script with this interpreter in the work folder, its output to the log: (stdout, seconds)."""
        command = [sys.executable, *map(str, command)]
        self.log(f"$ {' '.join(command)}")
        start = time.perf_counter()
        result = subprocess.run(command, cwd=self.work, capture_output=True, text=True,
                                timeout=min(timeout, max(1, self.deadline - time.monotonic())))
        self.log(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(str(command[1])).name} exited {result.returncode}: "
                               f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        return result.stdout, time.perf_counter() - start


def run_stage(check, name, stage):
    """Run one stage; its result, or the error that ended it, goes into the report, which is saved at once."""
    if time.monotonic() > check.deadline:
        check.report["stages"][name] = {"ok": False, "error": "not run: the time limit was reached"}
    elif name != "device" and check.device is None:
        check.report["stages"][name] = {"ok": False, "error": "not run: no device (see the device stage)"}
    else:
        start = time.perf_counter()
        try:
            result = {"ok": True, **stage(check)}
        except Exception as error:  # a failed stage is a finding; the next stages still run
            check.log(traceback.format_exc())
            result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        check.report["stages"][name] = result
    check.save()
    print(f"{name}: {json.dumps(check.report['stages'][name])}", flush=True)


# ----------------------------------------------------------------------------- the stages

def device_stage(check):
    device = data.pick_device(check.args.device)
    check.device = device
    result = {"device": str(device), "precision_auto": data.pick_precision("auto", device),
              "torch": str(torch.__version__), "cuda": torch.version.cuda, "python": platform.python_version()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result.update(name=properties.name, capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                      memory_gib=round(properties.total_memory / 2**30, 1), arch_list=torch.cuda.get_arch_list(),
                      cudnn=torch.backends.cudnn.version())
    else:
        result["name"] = bench.machine_description()["cpu"]
    return result


def bench_stage(check):
    images = check.args.limit or 12_800
    batch = 128 if images >= 1280 else 16  # a --limit check tests the stage, not the speed
    precision = data.pick_precision("auto", check.device)
    result = {"precision": precision, "images": images, "batch_size": batch}
    for arch in ("vgg", "resnet", "widecnn"):
        measured = bench.measure_training(arch, precision, batch, check.device, images, check.args.data_dir, rounds=2)
        result[arch] = {"ours": round(measured["images_per_second"]),
                        "ceiling": round(measured["ceiling_images_per_second"])}
    return result


# What CUDA's sync debug mode says at a synchronizing call. Its once-only notice on being turned on ("Synchronization
# debug mode is a prototype feature ...") is not one: the H200's first check counted it as one.
SYNC_WARNING = "called a synchronizing CUDA operation"


class SyncCounter:
    """A progress bar (as the loops open one) that turns CUDA's sync debug mode to "warn" while it is open."""

    def __init__(self, device):
        self.device, self.messages = device, []

    def progress_bar(self, total, description):
        counter = self

        class Bar:
            def __init__(self):
                if counter.device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")

            def update(self):
                pass

            def close(self):
                if counter.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        return Bar()

    def count(self, run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        found = [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught
                 if SYNC_WARNING in str(w.message)]
        self.messages += found
        return len(found)


def sync_stage(check):
    device = check.device
    images, labels = data.load_mnist(check.args.data_dir, "train")
    count = check.args.limit or 12_800
    images, labels = images[:count].to(device), labels[:count].to(device)
    counter = SyncCounter(device)
    original, data.progress_bar = data.progress_bar, counter.progress_bar
    result = {"sync_debug_mode": device.type == "cuda", "images": count}
    try:
        for precision in dict.fromkeys([data.pick_precision("auto", device), "fp16"]):
            settings = {"batch_size": 128, "precision": precision, "augmentation": "strong", "optimizer": "adam",
                        "lr": 1e-3,
                        "schedule": "warmup-cosine", "warmup_epochs": 0.3, "epochs": 1, "label_smoothing": 0.1,
                        "ema_decay": 0.999, "normalization": data.NORMALIZATION}
            model = train_cnn.new_model("vgg", device, 0)
            training = train_cnn.make_training(model, settings, train_cnn.steps_per_epoch(count, 128), seed=0)
            result[f"epoch_{precision}_sync_warnings"] = counter.count(
                lambda: train_cnn.train_one_epoch(model, images, labels, training, settings))  # noqa: B023
        ensemble = [(model.eval(), data.NORMALIZATION, "vgg"), (train_cnn.new_model("widecnn", device, 1).eval(),
                                                                data.NORMALIZATION, "widecnn")]
        result["tta_sync_warnings"] = counter.count(lambda: predict_tta.ensemble_probabilities(
            ensemble, images[:2048], augmentation.TTA_VARIANTS, data.pick_precision("auto", device), seed=0))
    finally:
        data.progress_bar = original
    result["sync_warnings"] = sum(v for k, v in result.items() if k.endswith("_sync_warnings"))
    result["sync_messages"] = sorted(set(counter.messages))[:20]
    return result


def test_report(stdout):
    """(test accuracy, training seconds) from train_cnn.py's last lines."""
    accuracy = float(re.search(r"test loss \S+\s+accuracy (\S+)", stdout)[1])
    seconds = re.search(r"training took (\d+)s", stdout)
    return accuracy, int(seconds[1]) if seconds else None


def pipeline_a_stage(check):
    result = {}
    for precision in ("auto", "fp16"):
        stdout, seconds = check.script(ROOT / "train_cnn.py", "--data-dir", check.args.data_dir, "--epochs", "2",
                                       "--precision", precision, "--device", check.args.device, "--retrain",
                                       "--checkpoint", f"pipeline_a_{precision}.pth", *check.limit(), timeout=150)
        accuracy, training = test_report(stdout)
        result[precision] = {"precision": re.search(r"precision (\w+)", stdout)[1], "test_accuracy": accuracy,
                             "training_seconds": training, "seconds": round(seconds, 1)}
    return result


def pipeline_b_stage(check):
    test_images, test_labels = data.load_mnist(check.args.data_dir, "test")
    count = check.args.limit or len(test_labels)
    data.write_images_csv(check.work / "test.csv", test_images[:count])
    data.write_submission(check.work / "test_labels.csv", test_labels[:count])
    stdout, train_seconds = check.script(
        ROOT / "train_kfold.py", "--data", "mnist", "--data-dir", check.args.data_dir, "--archs", "resnet", "widecnn",
        "--folds", "0", "--epochs", "1", "--device", check.args.device, "--out", "models", "--retrain", *check.limit(),
        timeout=150)
    accuracies = dict(re.findall(r"\[(\w+) fold 0\] done in \d+s, val accuracy (\S+)", stdout))
    stdout, predict_seconds = check.script(
        ROOT / "predict_tta.py", "--weights", "models", "--test-csv", "test.csv", "--labels", "test_labels.csv",
        "--out", "submission.csv", "--device", check.args.device)
    return {"val_accuracy": {arch: float(value) for arch, value in accuracies.items()},
            "train_seconds": round(train_seconds, 1), "tta_test_accuracy": float(re.search(r"accuracy (\S+)",
                                                                                           stdout)[1]),
            "predict": re.search(r"predicted in .*", stdout)[0], "predict_seconds": round(predict_seconds, 1)}


def torchrun_stage(check):
    stdout, seconds = check.script(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", ROOT / "train_kfold.py", "--data", "mnist",
        "--data-dir", check.args.data_dir, "--archs", "vgg", "--folds", "0", "--epochs", "1",
        "--device", "cuda" if check.device.type == "cuda" else check.args.device, "--out", "torchrun", "--retrain",
        *check.limit(12_000))
    return {"device_line": re.search(r"^(?:rank 0: )?(device .*)", stdout, re.MULTILINE)[1],
            "val_accuracy": float(re.search(r"val accuracy (\S+)", stdout)[1]), "seconds": round(seconds, 1)}


def weights_equal(first, second):
    """True when two checkpoints hold the same weights, bit for bit."""
    second = checkpoints.load(second)["model_state"]
    return all(torch.equal(tensor, second[name]) for name, tensor in checkpoints.load(first)["model_state"].items())


def deterministic_run(check):
    """train_cnn.py and its flags for the deterministic stage's two runs, the run the resume stage kills and resumes."""
    return [ROOT / "train_cnn.py", "--data-dir", check.args.data_dir, "--epochs", "4", "--patience", "10", "--device",
            check.args.device, "--use-deterministic-algorithms", *check.limit(6_000)]


def deterministic_stage(check):
    for name in ("deterministic_1", "deterministic_2"):
        check.script(*deterministic_run(check), "--retrain", "--checkpoint", f"{name}.pth")
    return {"bit_for_bit": weights_equal(check.work / "deterministic_1.pth", check.work / "deterministic_2.pth")}


def resume_stage(check):
    uninterrupted = check.work / "deterministic_1.pth"
    if not uninterrupted.exists():
        raise RuntimeError("no uninterrupted run to compare with: the deterministic stage did not finish its first run")
    command = [sys.executable, *map(str, deterministic_run(check))]
    killed = [*command, "--checkpoint", "resumed.pth", "--retrain"]
    check.log(f"$ {' '.join(killed)}   (killed once its first epoch is saved)")
    process = subprocess.Popen(killed, cwd=check.work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_file = check.work / "resumed.resume.pth"
    while process.poll() is None and not resume_file.exists():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_after = (checkpoints.read(resume_file, checkpoints.RESUME_KEYS)["progress"]["epoch"]
                    if resume_file.exists() else None)
    stdout, _ = check.script(*command[1:], "--checkpoint", "resumed.pth")
    return {"killed_after_epoch": killed_after, "resumed": "resuming resumed.pth" in stdout,
            "matches_uninterrupted": weights_equal(uninterrupted, check.work / "resumed.pth")}


STAGE_FUNCTIONS = {"device": device_stage, "bench": bench_stage, "sync": sync_stage, "pipeline_a": pipeline_a_stage,
                   "pipeline_b": pipeline_b_stage, "torchrun": torchrun_stage, "deterministic": deterministic_stage,
                   "resume": resume_stage}


def parse_args(argv=None):
    p = cli.Parser(__doc__)
    p.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR,
                   help="folder holding MNIST/raw/*.gz (env MNIST_DATA_DIR)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N (or cpu, to test this script)")
    p.add_argument("--out", default="gpu-check", help="folder for gpu_check.json, gpu_check.log and the runs' files")
    p.add_argument("--limit", type=cli.positive_int,
                   help="at most this many images per run (a quick check of the logic)")
    p.add_argument("--time-limit", type=float, default=230,
                   help="seconds; stages not begun by then are reported as not run")
    args = p.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    return args


def main(argv=None):
    check = Check(parse_args(argv))
    for name in STAGES:
        run_stage(check, name, STAGE_FUNCTIONS[name])
    stages = check.report["stages"]
    print(f"wrote {check.out / 'gpu_check.json'}: {sum(s['ok'] for s in stages.values())} of {len(stages)} stages ok")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli.run_cli(main)
