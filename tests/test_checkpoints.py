"""Checkpoints you can trust: where a resumed run's optimizer state lives, and fused Adam only where the device has it."""
import dataclasses
import os
import shutil
import warnings

import pytest
import torch

import checkpoint
import main
from common import Run, numbered_snapshots
from conftest import CPU, tiny_config, write_config, write_fake_mnist

SETTINGS = {"training.snapshot_freq": 3, "fast.fused_adam": False}  # torch's default Adam: `step` on the CPU


def config(tmp, data, n_iters, **more):
    return write_config(os.path.join(tmp, f"c{n_iters}.yml"),
                        tiny_config(data, **{"training.n_iters": n_iters, **SETTINGS, **more}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs trained once: 'r' to step 6 and 'r9' to step 9 (snapshots every 3 steps, checkpoint.pth a hard
    link to the newest), and 'full', the same run unbroken to step 12."""
    tmp = str(tmp_path_factory.mktemp("ckpt_runs"))
    data = write_fake_mnist(os.path.join(tmp, "data"))
    for doc, n in (("r", 6), ("r9", 9), ("full", 12)):
        assert main.main([*CPU, "--config", config(tmp, data, n), "--run", os.path.join(tmp, "run"), "--doc", doc]) == 0
    return tmp, data


def copy_run(runs, doc, tmp_path):
    """A copy of the run `doc` under tmp_path/run, with checkpoint.pth a hard link to the newest snapshot again."""
    src = os.path.join(runs[0], "run", "logs", doc)
    dst = tmp_path / "run" / "logs" / doc
    shutil.copytree(src, dst)
    newest = max(numbered_snapshots(dst))[1]
    os.remove(dst / "checkpoint.pth")
    os.link(dst / newest, dst / "checkpoint.pth")
    return dst


def cli(capsys, tmp_path, *args):
    """main.main(args) with --run tmp_path/run: (exit status, ERROR lines, WARNING lines, stdout, stderr)."""
    capsys.readouterr()
    code = main.main([*CPU, "--run", str(tmp_path / "run"), *map(str, args)])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    return (code, [x for x in lines if x.startswith("ERROR")], [x for x in lines if x.startswith("WARNING")], out,
            err)


# ----------------------------------------------------------------------------------------------------------
# Where the restored state lives: a "meta" device stands in for a GPU (its tensors have a device, no data)

def restored_on_meta(runs, fused_adam, monkeypatch):
    import devices
    import runner

    run = Run(os.path.join(runs[0], "run"), "r")
    ckpt = checkpoint.latest_checkpoint(run)  # as train() reads it for --resume_training
    assert all(t.device.type == "cpu" for s in ckpt["optimizer"]["state"].values() for t in s.values())
    cfg = checkpoint.checkpoint_config(ckpt, run.ckpt_path)
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, fused_adam=fused_adam))
    monkeypatch.setattr(devices, "fused_adam_ok", lambda device: True)
    model = runner.make_model(cfg, torch.device("meta"))
    optimizer = runner.make_optimizer(cfg, model)
    with warnings.catch_warnings():  # "copying from a non-meta parameter ... is a no-op": meta tensors hold no data
        warnings.filterwarnings("ignore", ".*copying from a non-meta parameter")
        assert checkpoint.restore(ckpt, model, None, optimizer, torch.Generator(), cfg, run.ckpt_path) == 6
    return model, optimizer


def test_restore_moves_the_adam_moments_and_keeps_default_adams_step_on_the_cpu(runs, monkeypatch):
    model, optimizer = restored_on_meta(runs, False, monkeypatch)
    for p in model.parameters():
        state = optimizer.state[p]
        assert state["exp_avg"].device.type == state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"  # where torch keeps it for its default (for-each) Adam


def test_restore_for_fused_adam_puts_step_beside_the_parameters(runs, monkeypatch):
    model, optimizer = restored_on_meta(runs, True, monkeypatch)
    assert optimizer.param_groups[0]["fused"] is True
    assert all(optimizer.state[p]["step"].device.type == "meta" for p in model.parameters())


def test_resume_asks_for_fused_adam_only_where_the_device_has_it(runs, tmp_path, capsys, monkeypatch):
    import devices

    copy_run(runs, "r", tmp_path)
    asked = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        asked.append(self.param_groups[0]["fused"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(devices, "fused_adam_ok", lambda device: False)  # a device without fused Adam
    fused = config(tmp_path, runs[1], 8, **{"fast.fused_adam": True})
    code, errors, _, _, err = cli(capsys, tmp_path, "--config", fused, "--doc", "r", "--resume_training")
    assert code == 0 and "resuming at step 7 of 8" in err, err
    assert asked == [None, None]  # torch's default Adam in both resumed steps, as a fresh run would use
