"""Runs main.py commands in child processes with checkpoint writes slowed down, so that the fault-injection tests
can SIGKILL or signal a run at any moment, also in the middle of a checkpoint write. Only torch.save is slowed
(it sleeps after writing its bytes, before atomic_torch_save's fsync and rename); everything else is the real
code path.

It is a fork server: it imports torch and the project once, then forks one child per command, so a run starts
in a fraction of a second instead of paying the imports again after each kill. A child runs nothing but
main.main(argv) in its own process (the server itself never trains), and its exit status is the one
`python main.py` would have.

    python tests/kill_driver.py            # then one command a line on stdin: {"argv": [...], "out": PATH}

For each command it prints {"pid": PID} once the child runs, writes the child's stdout and stderr to PATH, and
when the child has ended writes its exit status (negative: killed by that signal) to PATH.exit and prints
{"pid": PID, "status": STATUS}.
"""
import json
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_save = torch.save


def slow_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    time.sleep(float(os.environ.get("NCSN_SLOW_SAVE", "0.1")))


torch.save = slow_save

import main  # noqa: E402
# what a training run imports, once, here: the children start training in a fraction of a second
import runner  # noqa: E402,F401
import tensorboardX  # noqa: E402,F401
import torchvision.datasets  # noqa: E402,F401


def run_child(argv, out):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = 1
    try:
        code = main.main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    command = json.loads(line)
    pid = os.fork()
    if pid == 0:
        run_child(command["argv"], command["out"])
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(status)
    with open(command["out"] + ".exit.tmp", "w") as f:
        f.write(str(status))
    os.rename(command["out"] + ".exit.tmp", command["out"] + ".exit")
    print(json.dumps({"pid": pid, "status": status}), flush=True)
