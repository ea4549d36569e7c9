"""Every bad input gets a one-line error, a non-zero exit and leaves the files of an existing run as they were."""
import os

import pytest
import torch

import main
from conftest import CPU, copy_tiny_run, snapshot_tree, tiny_config, write_config, write_fake_mnist


def run(tmp_path, capsys, *args):
    capsys.readouterr()
    code = main.main([*CPU, "--run", str(tmp_path / "run"), *map(str, args)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    return code, errors, err


@pytest.fixture
def trained(tmp_path, tiny_run):
    """A finished tiny run 'r' (6 steps, snapshots at 3 and 6) in tmp_path/run: a copy of the session's."""
    copy_tiny_run(tiny_run, tmp_path / "run")


def assert_one_line_error(code, errors, err, *words):
    assert code != 0
    assert len(errors) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, errors[0])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_mnist_file(tmp_path, capsys, damage):
    data = write_fake_mnist(str(tmp_path / "data"))
    path = os.path.join(data, "MNIST", "raw", "train-images-idx3-ubyte")
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2] if damage == "truncated" else os.urandom(len(blob)))
    cfg = write_config(tmp_path / "c.yml", tiny_config(data))
    assert_one_line_error(*run(tmp_path, capsys, "--config", cfg, "--doc", "m"), "MNIST", "raw")
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint(tmp_path, capsys, trained):
    logs = tmp_path / "run" / "logs" / "r"
    blob = (logs / "checkpoint.pth").read_bytes()
    os.remove(logs / "checkpoint.pth")  # a separate file (it was a hard link to checkpoint_6.pth)
    (logs / "checkpoint.pth").write_bytes(blob[: len(blob) // 3])
    before = snapshot_tree(tmp_path / "run")
    assert_one_line_error(*run(tmp_path, capsys, "--doc", "r", "--sample", "-o", tmp_path / "o"),
                          "checkpoint.pth is truncated", "the newest intact snapshot is checkpoint_6.pth, use it "
                          "with --ckpt 6")
    assert snapshot_tree(tmp_path / "run") == before  # (resume takes checkpoint_6.pth: tests/test_checkpoints.py)


@pytest.mark.parametrize("key,value", [("model.ngf", 8), ("model.num_classes", 6)])
def test_checkpoint_of_another_architecture(tmp_path, capsys, fake_mnist, trained, key, value):
    before = snapshot_tree(tmp_path / "run")
    cfg = write_config(tmp_path / "other.yml", tiny_config(fake_mnist, **{"training.n_iters": 9, key: value}))
    code, errors, err = run(tmp_path, capsys, "--config", cfg, "--doc", "r", "--resume_training")
    assert_one_line_error(code, errors, err, "different architecture", f"{key} = ", f"asks for {value}")
    assert snapshot_tree(tmp_path / "run") == before


def test_resume_with_other_training_settings_is_refused(tmp_path, capsys, fake_mnist, trained):
    before = snapshot_tree(tmp_path / "run")
    cfg = write_config(tmp_path / "lr.yml", tiny_config(fake_mnist, **{"training.n_iters": 9, "optim.lr": 0.01}))
    assert_one_line_error(*run(tmp_path, capsys, "--config", cfg, "--doc", "r", "--resume_training"),
                          "differs from the checkpoint's in optim.lr")
    done = write_config(tmp_path / "done.yml", tiny_config(fake_mnist))
    assert_one_line_error(*run(tmp_path, capsys, "--config", done, "--doc", "r", "--resume_training"),
                          "--set training.n_iters=N")
    assert snapshot_tree(tmp_path / "run") == before


def test_unwritable_output_folders(tmp_path, capsys, fake_mnist, trained):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = tiny_config(fake_mnist)
    code = main.main([*CPU, "--config", write_config(tmp_path / "u.yml", cfg), "--run", str(blocker / "run"), "--doc", "u"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot write the run folder" in err and "Traceback" not in err
    before = snapshot_tree(tmp_path / "run")
    assert_one_line_error(*run(tmp_path, capsys, "--doc", "r", "--sample", "-o", blocker / "out"),
                          "cannot create the image folder")
    assert snapshot_tree(tmp_path / "run") == before


def test_no_checkpoint_for_resume_or_sample(tmp_path, capsys, fake_mnist):
    cfg = write_config(tmp_path / "c.yml", tiny_config(fake_mnist))
    assert_one_line_error(*run(tmp_path, capsys, "--config", cfg, "--doc", "new", "--resume_training"),
                          "no run folder", "to resume")
    assert_one_line_error(*run(tmp_path, capsys, "--doc", "new", "--sample", "-o", tmp_path / "o"),
                          "no checkpoint at")
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def test_keep_snapshots_keeps_the_newest(tmp_path, capsys, fake_mnist):
    cfg = write_config(tmp_path / "k.yml", tiny_config(fake_mnist, **{"training.n_iters": 10,
                                                                      "training.snapshot_freq": 2,
                                                                      "training.keep_snapshots": 2}))
    assert run(tmp_path, capsys, "--config", cfg, "--doc", "k")[0] == 0
    logs = tmp_path / "run" / "logs" / "k"
    assert sorted(f for f in os.listdir(logs) if f.endswith(".pth")) == \
        ["checkpoint.pth", "checkpoint_10.pth", "checkpoint_8.pth"]
    assert torch.load(logs / "checkpoint.pth", weights_only=True)["step"] == 10
