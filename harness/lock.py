"""One process per run folder: two commands on the same --out at once never mix their files.

A process claims a run folder by creating its lock file exclusively (the operating system lets exactly one of two
processes create it, however close together they start); the lock names its holder (pid, host, start, command), so
that the second command can say who has the folder. A lock whose process is gone (on this host) is stale and taken
over, so a killed run never blocks its folder.
"""
import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import files

LOCK = "run.lock"  # in a run folder while a process works in it: {pid, host, since, command}


@contextlib.contextmanager
def claimed(folder):
    """The run folder belongs to this process while the block runs: its lock file is created exclusively (one
    process wins, however close together two start), and a second process is refused with the holder's pid, host
    and command. A lock whose process is gone (same host) is stale and taken over; the lock goes when the block ends."""
    folder = Path(folder).absolute()
    created = [p for p in [folder, *folder.parents] if not p.exists()]  # the folders this run makes, deepest first
    folder.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    while True:
        try:
            fd = os.open(folder / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            in_use(folder)  # raises while another live process holds it
            (folder / LOCK).unlink(missing_ok=True)  # stale
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    except files.InputError:  # bad input found inside the run (a missing dataset): leave no folder of ours behind
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    finally:
        (folder / LOCK).unlink(missing_ok=True)


def in_use(folder):
    """Raise InputError when another live process holds the folder's lock (see `claimed`)."""
    try:
        holder = json.loads((Path(folder) / LOCK).read_text())
    except FileNotFoundError:
        return
    except ValueError:  # just created, not written yet
        holder = {"pid": "?", "host": socket.gethostname(), "since": "now", "command": "?"}
    if holder["pid"] == os.getpid() or (holder["host"] == socket.gethostname() and not _alive(holder["pid"])):
        return
    raise files.InputError(f"{folder} is in use by process {holder['pid']} on {holder['host']} since "
                           f"{holder['since']} ({holder['command']}); wait for it to finish, or choose another --out")


def _alive(pid):
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True
