"""Run as a script: scripts/caption.py in this process, killed with SIGKILL at a chosen point.

Usage: python caption_kill_helper.py KILL_AFTER_BATCHES CAPTION_ARGS...

Counts generate() calls and sends SIGKILL to its own process when call number KILL_AFTER_BATCHES + 1
starts, i.e. after that many batches were captioned and written: a crash at a known point, without a
test hook in the tool itself.
"""

import os
import signal
import sys

from conftest import load_script  # this file's folder (tests/) is first on sys.path

from show_attend_tell.modeling_show_attend_tell import ShowAttendTellForConditionalGeneration

kill_after = int(sys.argv[1])
original_generate = ShowAttendTellForConditionalGeneration.generate
calls = 0


def generate_then_die(self, *args, **kwargs):
    global calls
    if calls == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    calls += 1
    return original_generate(self, *args, **kwargs)


ShowAttendTellForConditionalGeneration.generate = generate_then_die
sys.exit(load_script("caption").main(sys.argv[2:]))
