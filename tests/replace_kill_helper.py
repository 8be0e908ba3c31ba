"""Run as a script: training (the package's `train`, what scripts/train.py runs) in this process, killed with
SIGKILL while it replaces its model folder.

Usage: python replace_kill_helper.py exchange|two-renames TRAIN_ARGS...

exchange: the system's atomic exchange is used (as on Linux and macOS); the process dies right after it,
    before the old folder (now under the staging name) is deleted.
two-renames: the exchange is made unavailable (as on Windows or NFS), so the old folder is renamed aside
    first; the process dies right after that rename, before the new folder is renamed into place.
"""

import os
import signal
import sys
from pathlib import Path

import show_attend_tell.saving as saving
from show_attend_tell.training import build_parser, check_args, train

mode = sys.argv[1]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "exchange":
    original_rmtree = saving.shutil.rmtree

    def rmtree_after_exchange(path, *args, **kwargs):
        if Path(path).name.startswith(".model.tmp-"):  # the old folder, exchanged out of `model`
            die()
        return original_rmtree(path, *args, **kwargs)

    saving.shutil.rmtree = rmtree_after_exchange
elif mode == "two-renames":
    original_replace = saving.os.replace
    saving.exchange_paths = lambda first, second: False

    def replace_then_die(source, destination):
        original_replace(source, destination)
        if Path(source).name == "model" and Path(destination).name.startswith(".model.old-"):
            die()  # `model` is set aside; the new folder is not in place yet

    saving.os.replace = replace_then_die
else:
    raise SystemExit(f"unknown mode {mode!r}")

args = build_parser().parse_args(sys.argv[2:])
check_args(args)
train(args)
