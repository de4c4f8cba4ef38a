"""PyTorch against onnxruntime on this CPU: median latency of one digit and throughput at batch 256.

For one `vgg` and for the 10-model ensemble (5 `resnet` + 5 `widecnn`, as make submission trains), each exported
with predict_tta.py's own export (parity checked), in one run: PyTorch eager in fp32, onnxruntime in fp32, and
PyTorch in the precision --precision auto picks here. The checkpoints are freshly initialised ones in a temporary
folder: the time does not depend on the weights. Not collected by pytest: speed is measured here, not asserted.

    python tools/onnx_speed.py --data-dir ../shared/data --repeats 200
"""
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import predict_tta  # noqa: E402
from bench import machine_description  # noqa: E402
from models import build_model  # noqa: E402


def random_checkpoints(folder, archs):
    paths = []
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        paths.append(Path(folder) / f"{arch}_{i}.pth")
        checkpoints.save(paths[-1], {"model_state": build_model(arch).state_dict(), "arch": arch,
                                     "normalization": data.NORMALIZATION, "epoch": 1, "complete": True})
    return paths


def measure(predict, digits, repeats):
    """(median ms for one digit, images/s at batch 256) of predict(uint8 digits [N, 28, 28])."""
    one, batch = digits[:1], digits[:256]
    for _ in range(3):
        predict(one), predict(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(one)
        times.append(time.perf_counter() - start)
    start, batches = time.perf_counter(), max(3, repeats // 20)
    for _ in range(batches):
        predict(batch)
    return 1000 * statistics.median(times), batches * len(batch) / (time.perf_counter() - start)


def main():
    parser = cli.Parser(__doc__)
    parser.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="MNIST's test digits are the inputs")
    parser.add_argument("--repeats", type=cli.positive_int, default=200, help="single-digit predictions timed")
    args = parser.parse_args()
    onnxruntime = predict_tta.import_onnx()
    digits = data.load_mnist(args.data_dir, "test")[0][:256]
    auto = data.pick_precision("auto", torch.device("cpu"))
    machine = machine_description()
    print(f"{machine['cpu']}, {machine['torch_threads']} threads, torch {machine['torch']}, onnxruntime "
          f"{onnxruntime.__version__}; --precision auto picks {auto}; {args.repeats} single-digit predictions each\n")
    print(f"| model | PyTorch fp32 ms / img/s | onnxruntime fp32 ms / img/s | PyTorch {auto} ms / img/s |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name, archs in (("one vgg", ["vgg"]), ("10 models (5 resnet + 5 widecnn)",
                                                   ["resnet"] * 5 + ["widecnn"] * 5)):
            paths = random_checkpoints(folder, archs)
            cells = []
            for precision in ("fp32", "onnx", auto):
                if precision == "onnx":
                    graph = Path(folder) / f"{len(archs)}.onnx"
                    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." line
                        predict_tta.export_onnx(predict_tta.DigitReader(paths, "cpu", "fp32"), graph, args.data_dir)
                    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
                    predict = lambda d: session.run(None, {"digits": d.numpy()})[0]  # noqa: E731, B023
                else:
                    predict = predict_tta.DigitReader(paths, "cpu", precision).probabilities
                milliseconds, throughput = measure(predict, digits, args.repeats)
                cells.append(f"{milliseconds:.2f} / {throughput:.0f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    cli.run_cli(main)
