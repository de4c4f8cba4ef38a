"""What every script shares to be a well-behaved command: one-line errors, the argument parser and its types, output
checks before any work, and files written whole (atomic writes; JSON, CSV and NumPy writers).

Nothing here knows about digits: data.py, photos.py, checkpoints.py and the scripts build on it, and it imports none
of them. In this file: one-line errors, the parser and its types, then files.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------- one-line errors

class UserError(Exception):
    """A problem the user can fix (bad file, bad flag); scripts print it as one line and exit with code 2."""

def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    if hasattr(sys.stdout, "reconfigure"):  # each epoch's line reaches a log file or a notebook cell as it is printed
        sys.stdout.reconfigure(line_buffering=True)
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


MAX_QUOTED = 100  # characters of an offending cell quoted in an error message


def quoted(value):
    """repr(value), cut to MAX_QUOTED characters: a 5 MB cell must not become a 5 MB error line."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + f"... ({len(text)} characters)"


def brief(error, choose=lambda lines: lines[0]):
    """One line of an exception's message for a one-line error: the line `choose` picks, cut to 2 * MAX_QUOTED."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip(" )")] or [type(error).__name__]
    return choose(lines)[:2 * MAX_QUOTED]


# ----------------------------------------------------------------------------- the parser and its types

class Parser(argparse.ArgumentParser):
    """argparse with every default in --help and a bad flag told in two lines: a short usage, then the error."""

    def __init__(self, description=None, **options):
        super().__init__(description=description, formatter_class=HelpFormatter, **options)

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]; see --help\n{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (where there is one to show), and the module docstring's command examples kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def checked(convert, accepts, expected, name):
    """An argparse type: `convert` the text, then refuse what `accepts` does not, saying it `expected`."""
    def parse(text):
        value = convert(text)
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    parse.__name__ = name  # argparse names the type in "invalid positive_int value: 'x'"
    return parse


MAX_SEED = 2**32 - 1000  # numpy and scikit-learn take seeds below 2**32; runs derive a few seeds above --seed
positive_int = checked(int, lambda v: v > 0, "a positive integer", "positive_int")
nonnegative_int = checked(int, lambda v: v >= 0, "a whole number >= 0", "nonnegative_int")
seed_int = checked(int, lambda v: 0 <= v < MAX_SEED, f"an integer in 0..{MAX_SEED - 1}", "seed_int")
port_number = checked(int, lambda v: 1 <= v <= 65535, "a port number in 1..65535", "port_number")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number", "positive_float")
nonnegative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0", "nonnegative_float")
fraction = checked(float, lambda v: 0 < v < 1, "between 0 and 1", "fraction")
below_one = checked(float, lambda v: 0 <= v < 1, "in [0, 1)", "below_one")  # label smoothing, EMA decay: 0 is off


def duration(text):
    """An argparse type: a duration such as 90s, 10m, 2h or 1h30m -> seconds (float)."""
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    seconds = match and sum(float(part or 0) * unit for part, unit in zip(match.groups(), (3600, 60, 1), strict=True))
    if not seconds or not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"must be a duration such as 90s, 10m, 2h or 1h30m, got {text}")
    return seconds


def format_duration(seconds):
    """Seconds as the shortest of '2h', '10m' or '90s' that is exact (rounded to whole seconds otherwise)."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    Readers see the old file or the new one, never half of one, even if the process is killed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def remove_orphaned_temporaries(path):
    """Remove the temporary files of `path` left by writers that were killed (their process no longer exists)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)

def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True

def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask

def check_writable(path):
    """Fail at start-up, not after an hour of training, when an output file cannot be written; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    check_folder_writable(path.parent, path)

def check_output_folder(flag, path):
    """Fail at start-up when an output folder cannot be made or written to (or a file is in its place)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: a file is in the way of this output folder")
    check_folder_writable(path, path)

def check_folder_writable(folder, target):
    """A file can be created in `folder`, or, where it does not exist yet, in the nearest part of it that does."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {target}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"cannot write {target}: {error.strerror or error}") from None

def same_file(a, b):
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()

def check_outputs(outputs, inputs):
    """Before any work: every output file is writable, not a folder, and none is one of the run's inputs.

    outputs, inputs: {flag: [paths]}, the flag naming where each path came from in the error message.
    """
    named_inputs = [(flag, Path(p)) for flag, paths in inputs.items() for p in paths if p is not None]
    for flag, paths in outputs.items():
        for path in map(Path, paths):
            for input_flag, input_path in named_inputs:
                if same_file(path, input_path):
                    raise UserError(f"{flag} would overwrite an input ({path} is {input_flag} {input_path}); "
                                    "choose another output path")
            check_writable(path)

def write_numpy(path, value):
    """An array as .npy, or a dict of arrays as .npz, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(value, dict):
            np.savez(f, **value)
        else:
            np.save(f, value)

def read_json(path, what="readable JSON", remedy="remove it to start again"):
    """A JSON file the project wrote; when it cannot be read, a UserError naming it, `what` it is not, and `remedy`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not {what} ({brief(error)}); {remedy}") from None


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_frame(path, frame):
    """Write a DataFrame as CSV, atomically (the old file or the new one, never half of one)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)

