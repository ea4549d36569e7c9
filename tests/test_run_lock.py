"""One training command a run folder: a second one is refused while the first holds the folder's lock, the lock goes
with the process that held it (SIGKILL included), and a fresh start whose folder got a checkpoint while it started
writes nothing; where nothing can be locked, training runs and says so."""
import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest

import runner
from conftest import REPO, TINY_DOC, cli, copy_tiny_run, snapshot_tree, tiny_config, write_config

HOLDER = """import sys
sys.path.insert(0, {repo!r})
from rundir import Run, RunLock
lock = RunLock(Run({root!r}, {doc!r}))
lock.take()
print("held", flush=True)
sys.stdin.read()  # until killed (or this test's process is gone): no time limit that a slow machine could reach
"""


def hold_lock(root, doc):
    """Another process that takes the run folder's lock as a training command does, and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=REPO, root=str(root), doc=doc)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_training_command_is_refused_while_another_holds_the_run(tmp_path, tiny_run, capsys,
                                                                         monkeypatch):
    root = tmp_path / "run"
    copy_tiny_run(tiny_run, root)
    os.makedirs(root / "logs" / "empty")  # a start that stopped before its first checkpoint
    cfg = write_config(tmp_path / "c.yml", tiny_config(tiny_run / "data", **{"training.n_iters": 8}))
    built = []
    create = runner.TrainState.create
    monkeypatch.setattr(runner.TrainState, "create", lambda *a, **k: built.append(1) or create(*a, **k))
    for doc, extra in ((TINY_DOC, ["--resume_training"]), ("empty", [])):  # a resume; a start into a folder
        holder = hold_lock(root, doc)
        try:
            before = snapshot_tree(root)
            code, errors, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", doc, *extra)
            assert code == 1 and len(errors) == 1, err
            assert "is in use by another training command" in errors[0] and f"pid {holder.pid} on" in errors[0], err
            assert not built  # refused before it reads a checkpoint or builds the network
            assert snapshot_tree(root) == before  # nothing written, nothing removed
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
        # the killed holder left its lock file, but no lock: the same command now runs
        code, _, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", doc, *extra)
        assert code == 0, err
        built.clear()


def test_a_fresh_start_whose_folder_got_a_checkpoint_while_it_started_writes_nothing(tmp_path, tiny_run, capsys,
                                                                                     monkeypatch):
    root = tmp_path / "run"
    logs = root / "logs" / "new"
    cfg = write_config(tmp_path / "c.yml", tiny_config(tiny_run / "data"))
    create = runner.TrainState.create

    def another_command_saves_meanwhile(*args, **kwargs):  # while this one builds its network
        state = create(*args, **kwargs)
        os.makedirs(logs)
        shutil.copy(tiny_run / "run" / "logs" / TINY_DOC / "checkpoint_3.pth", logs / "checkpoint_3.pth")
        return state

    monkeypatch.setattr(runner.TrainState, "create", another_command_saves_meanwhile)
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", "new")
    assert code == 1 and len(errors) == 1 and "got a checkpoint from another training command" in errors[0], err
    assert sorted(os.listdir(logs)) == [".train.lock", "checkpoint_3.pth"]  # its checkpoint as it was, no config.yml


@pytest.mark.parametrize("why", ["no fcntl", "no locks on this file system"])
def test_where_nothing_can_be_locked_training_runs_and_says_so(tmp_path, fake_mnist, capsys, monkeypatch, why):
    if why == "no fcntl":  # Windows
        monkeypatch.setitem(sys.modules, "fcntl", None)
    else:
        import fcntl

        def no_locks(*args):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        monkeypatch.setattr(fcntl, "lockf", no_locks)
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist, **{"training.n_iters": 2}))
    code, _, _, _, err = cli(capsys, tmp_path, "--config", cfg, "--doc", "w")
    assert code == 0 and "a second training command of this run at once would not be refused" in err
