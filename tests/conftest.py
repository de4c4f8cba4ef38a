"""Shared test helpers: synthetic IDX/CSV files, the real MNIST location, running the scripts, and killing a run."""
import contextlib
import gzip
import importlib
import io
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the scripts, and the tools some tests run

import checkpoints  # noqa: E402
import data  # noqa: E402
from cli import run_cli  # noqa: E402


def write_idx(path, array, magic):
    """Write an IDX file (gzipped when the name ends in .gz) holding a uint8 array."""
    array = np.asarray(array, dtype=np.uint8)
    payload = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def synthetic_mnist(root, n_train=40, n_test=20, gz=True, seed=0):
    """A tiny MNIST folder (random pixels, balanced labels) in torchvision's layout."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, 2049)
    return Path(root)


MNIST_CANDIDATES = (os.environ.get("MNIST_DATA_DIR"), ROOT / "data", ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files: $MNIST_DATA_DIR, else <repo>/data (where `make train` downloads), else ../shared/data.

    Never downloads: without the files, the tests that need them are skipped with this message.
    """
    for candidate in MNIST_CANDIDATES:
        raw = Path(candidate) / "MNIST" / "raw" if candidate else None
        if raw and all(data.find_idx_file(raw, stem) for stems in data.MNIST_FILES.values() for stem in stems):
            return Path(candidate).resolve()
    pytest.skip("real MNIST not found: set MNIST_DATA_DIR to a folder holding MNIST/raw/*.gz, or put them in ./data")


def random_steps(model, optimizer, steps, batch_size):
    """Take `steps` optimizer steps on random batches [batch_size, 1, 28, 28] (a loss that needs no labels),
    yielding after each one, for tests of what follows the weights."""
    for step in range(steps):
        loss = model(torch.randn(batch_size, 1, 28, 28)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


def run_script(script, *args, cwd, check=True):
    """Run a script's main() with these arguments in folder cwd, as its command line would, inside this process.

    In-process saves the seconds each Python start costs for torch; exit codes and output are as on the
    command line (run_cli's handling of errors included). Tests of processes themselves use subprocess.
    """
    module = importlib.import_module(Path(script).stem)
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_cli(lambda: module.main([str(arg) for arg in args]))
    except SystemExit as exit:
        returncode = exit.code if isinstance(exit.code, int) else 1
    finally:
        os.chdir(previous)
    result = subprocess.CompletedProcess(script, returncode, stdout.getvalue(), stderr.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def killed_once_saved(command, *files, cwd=None):
    """Start `command` (its words) as a process and kill it (SIGKILL) as soon as all `files` exist, or when it ends or
    300 s pass; whether they all existed: a run killed after it saved, for tests of resuming."""
    process = subprocess.Popen([str(word) for word in command], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not all(path.exists() for path in files) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return all(path.exists() for path in files)


def assert_user_error(result, *fragments):
    """A user error: exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def small_vgg(tmp_path_factory, mnist_dir):
    """A vgg trained briefly on 3,000 real MNIST images (about 97% accurate), with its history JSON; read only.

    Trained once for the whole run: under pytest-xdist the workers share the session's base folder, and the first
    to get there trains it while the others wait on a lock (the pattern pytest-xdist documents).
    """
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "small_vgg"
    with FileLock(str(shared / "small_vgg.lock")):
        checkpoint = folder / "CNN_best_model.pth"
        if not (checkpoint.exists() and checkpoints.is_complete(checkpoints.load(checkpoint))):
            folder.mkdir(exist_ok=True)
            run_script("train_cnn.py", "--data-dir", mnist_dir, "--limit", "3000", "--epochs", "2", "--batch-size",
                       "32", cwd=folder)
    return checkpoint
