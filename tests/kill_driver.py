"""Runs main.py in a child process with checkpoint writes slowed down, so the fault-injection test can
SIGKILL it in the middle of one. Only torch.save is slowed (it sleeps after writing its bytes, before
atomic_torch_save's fsync and rename); everything else is the real code path.

    python tests/kill_driver.py MAIN_ARGS...
"""
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    time.sleep(float(os.environ.get("NCSN_SLOW_SAVE", "0.2")))


torch.save = slow_save

import main  # noqa: E402

sys.exit(main.main(sys.argv[1:]))
