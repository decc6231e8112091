"""The bottom of the project: the error type for bad input, where data lives, and how a run's files are written.

Every module may import this one; it imports nothing of the project. A file a run keeps is written atomically
(a kill never leaves half a file), and files this project wrote are read back with errors that say what to do.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent  # the project's folder
ROOT = HERE / "data"  # the default --root: the built-in world is cached in ROOT/world


class InputError(ValueError):
    """Bad input from the user (a flag, a folder, a file): the scripts print its message as one `error:` line."""


def path(text):
    """argparse type of every path flag: '~' expanded and the path made absolute and normal, as the shell does for
    an unquoted ~: '--root=~/data' means the home folder's data, and '--root /x/' the same folder as '--root /x'."""
    return os.path.abspath(os.path.expanduser(text))

def path_or(*words):
    """argparse type: one of the words (e.g. 'auto', 'none') as it is, else a path (see `path`)."""
    return lambda text: text if text in words else path(text)


def progress(iterable, desc, disable=False, **kwargs):
    """A progress bar on a terminal only: a log file gets the epoch lines and no bars (TQDM_DISABLE=1: none at all)."""
    off = disable or os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false") or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, leave=False, disable=off, **kwargs)


UMASK = os.umask(0o022)  # read the process's umask (setting it is the only way) ...
os.umask(UMASK)  # ... and put it back at once


def atomic_write(path, write):
    """write(tmp_path) into a temporary file beside `path`, then rename: readers never see a half-written file.
    The file gets the permissions a plain open() would give it (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    """obj as indented JSON at path, written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def read_json(path):
    """A JSON file written by this project; a corrupt one is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); delete it (or rerun with --force)") from None


def read_torch(path, what_to_do):
    """torch.load with weights_only=True (never runs code from the file); a missing or unreadable file is an
    InputError that names it and says what to do."""
    if not Path(path).exists():
        raise InputError(f"{path} does not exist; {what_to_do}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbled, or a pickle that is not plain tensors and containers
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{path} is unreadable ({type(e).__name__}: {reason}); {what_to_do}") from None
