"""Every file the repository reads, damaged (a flipped bit, a byte that is not text) or truncated: one line naming
the file and the way out, a non-zero exit, never a traceback, and the file left as it was. Checkpoints are
tests/test_checkpoints.py's; here the config YAML (a new run's and a run's own), MNIST's IDX files, the classifier
cache, metrics.json and the TensorBoard event files that report.ipynb reads (common.read_scalars).

Each damage is placed by the file's structure (a key, a header field, a member, a record), never at a fraction
of the file's length: the files hold the test's temporary path (data.root), whose length differs between
machines."""
import os
import struct
import zipfile

import pytest
import torch
import yaml

import metrics
from common import NCSNError, read_metrics, read_scalars
from conftest import (REPO, TINY_DOC, cli, copy_tiny_run, sets, snapshot_tree, tiny_config, write_config,
                      write_fake_mnist)


def flipped(blob, pos, bit):
    """`blob` (bytes) with bit `bit` of byte `pos` flipped."""
    out = bytearray(blob)
    out[pos] ^= 1 << bit
    return bytes(out)


def assert_one_line(result, code, *words):
    """cli's result: exit status `code`, one ERROR line holding each of `words`, no traceback."""
    status, errors, _, _, err = result
    assert status == code and len(errors) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, errors[0])


# ----------------------------------------------------------------------------------------------------------
# Config YAML

def test_a_damaged_or_truncated_config_is_one_line_naming_it(tmp_path, capsys, fake_mnist):
    text = yaml.safe_dump(tiny_config(fake_mnist)).encode()
    cut = text.index(b"\noptim:\n")  # the sections after data, eval, fast and model are gone
    cases = {
        "not_utf8.yml": flipped(text, text.index(b"\n  batch_size:") + 3, 7),  # 'b' | 0x80: not UTF-8
        "control.yml": flipped(text, text.index(b"\n  ngf:") + 1, 5),  # ' ' ^ 0x20: NUL
        "empty.yml": b"",
        "truncated.yml": text[:cut],
    }
    words = {"not_utf8.yml": "is damaged: byte", "control.yml": "is damaged: byte", "empty.yml": "is empty",
             "truncated.yml": "missing section 'training'"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        assert_one_line(cli(capsys, tmp_path, "--config", tmp_path / name, "--doc", "m"), 2, str(tmp_path / name),
                        words[name])
        assert (tmp_path / name).read_bytes() == blob
    assert not (tmp_path / "run").exists()


def test_a_runs_damaged_config_names_it_and_the_way_out(tmp_path, capsys, tiny_run):
    copy_tiny_run(tiny_run, tmp_path / "run")
    path = tmp_path / "run" / "logs" / TINY_DOC / "config.yml"
    text = path.read_bytes()
    key = text.index(b"\n  n_iters:") + 3  # a line of the training section
    for blob, words in ((flipped(text, key, 7), "is damaged: byte"),  # 'n' | 0x80: not UTF-8
                        (text[:text.index(b"\nsampling:\n")], "missing section 'sampling'"),
                        (flipped(text, key + 2, 1), "unknown key")):  # 'i' ^ 2: n_kters
        path.write_bytes(blob)
        before = snapshot_tree(tmp_path / "run")
        for command in (["--sample", "-o", tmp_path / "o"], ["--resume_training"]):
            assert_one_line(cli(capsys, tmp_path, "--doc", TINY_DOC, *command), 2, str(path), words,
                            "restore it from a copy, or pass --config")
        assert snapshot_tree(tmp_path / "run") == before and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------
# MNIST's IDX files (truncated and random files: tests/test_bad_inputs.py)

@pytest.mark.parametrize("name,pos,bit,words", [
    ("train-labels-idx1-ubyte", 2, 0, "TypeError"),  # the type byte: 0x08 (uint8) -> 0x09 (int8)
    ("train-images-idx3-ubyte", 3, 2, "its IDX header does not match"),  # the number of dimensions: 3 -> 7
    ("train-images-idx3-ubyte", 7, 0, "is invalid for input of size"),  # the image count: 64 -> 65
    ("train-labels-idx1-ubyte", 8, 7, "a label outside 0..9"),  # the first label + 128
])
def test_a_damaged_mnist_file_is_named(tmp_path, capsys, name, pos, bit, words):
    data = write_fake_mnist(str(tmp_path / "data"))
    path = os.path.join(data, "MNIST", "raw", name)
    with open(path, "rb") as f:
        blob = flipped(f.read(), pos, bit)
    with open(path, "wb") as f:
        f.write(blob)
    cfg = write_config(tmp_path / "c.yml", tiny_config(data))
    assert_one_line(cli(capsys, tmp_path, "--config", cfg, "--doc", "m"), 1, f"{path} is truncated or corrupt",
                    words, "delete it to download it again")
    with open(path, "rb") as f:
        assert f.read() == blob
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# The classifier cache (truncated and foreign files: tests/test_metrics.py, tests/test_guidance.py)

def member_bytes(path, member):
    """(offset, length) of the stored bytes of the zip member whose name ends in `member` (torch.save stores
    every member uncompressed, after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_flipped_bit_in_the_classifier_cache_is_refused_by_eval(tmp_path, capsys, tiny_run):
    """torch.load does not check the CRC-32 of a member: a cache whose weights lost a bit loaded without a word."""
    copy_tiny_run(tiny_run, tmp_path / "run")
    data = write_fake_mnist(str(tmp_path / "data"))
    path = os.path.join(data, "MNIST", metrics.CACHE_NAME)
    torch.save({"format": metrics.CACHE_FORMAT, "model": metrics.DigitClassifier().state_dict(),
                "test_accuracy": 0.5, "fingerprint": metrics.classifier_fingerprint()}, path)
    metrics.get_classifier(data, "cpu")  # the intact cache is used as it is
    with zipfile.ZipFile(path) as z:
        weight = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    start, length = member_bytes(path, weight)
    with open(path, "rb") as f:
        blob = flipped(f.read(), start + length // 2, 0)
    with open(path, "wb") as f:
        f.write(blob)
    before = snapshot_tree(tmp_path / "run")
    assert_one_line(cli(capsys, tmp_path, "--doc", TINY_DOC, "--eval", *sets(f"data.root={data}")), 1,
                    f"classifier cache {path} is damaged", "CRC", "delete it to train the classifier again")
    with open(path, "rb") as f:
        assert f.read() == blob
    assert snapshot_tree(tmp_path / "run") == before


# ----------------------------------------------------------------------------------------------------------
# metrics.json: --eval appends to it, report.ipynb plots it (common.read_metrics both)

def test_a_damaged_or_truncated_metrics_json_stops_eval_before_it_samples(tmp_path, capsys, tiny_run):
    copy_tiny_run(tiny_run, tmp_path / "run")
    path = tmp_path / "run" / "logs" / TINY_DOC / "metrics.json"
    text = b'[\n {\n  "step": 6,\n  "fid": 80.5\n }\n]'
    assert read_metrics(str(path)) == []
    path.write_bytes(text)
    assert read_metrics(str(path)) == [{"step": 6, "fid": 80.5}]
    for blob, words in ((text[:len(text) - 4], "is damaged or truncated, not JSON"),
                        (flipped(text, 0, 5), "is damaged or truncated, not JSON"),  # '[' -> '{'
                        (flipped(text, text.index(b"step"), 0), "is damaged: not a list of records each with a step"),
                        (flipped(text, text.index(b"fid"), 7), "is damaged or truncated, not JSON")):  # not UTF-8
        path.write_bytes(blob)
        before = snapshot_tree(tmp_path / "run")
        assert_one_line(cli(capsys, tmp_path, "--doc", TINY_DOC, "--eval"), 1, str(path), words, "move it aside")
        assert snapshot_tree(tmp_path / "run") == before


# ----------------------------------------------------------------------------------------------------------
# TensorBoard's event files, read back by report.ipynb through common.read_scalars

def write_events(folder, steps=5):
    """An event file of `steps` scalars 'loss' (step k: 1 / k) written by tensorboardX; returns its path and the
    offset of each record (the first is the file's version)."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for k in range(1, steps + 1):
            writer.add_scalar("loss", 1.0 / k, k)
    (name,) = os.listdir(folder)
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        blob = f.read()
    starts, pos = [], 0
    while pos < len(blob):
        starts.append(pos)
        pos += 16 + struct.unpack("<Q", blob[pos:pos + 8])[0]
    return path, starts


def test_a_damaged_event_file_is_one_line_and_a_cut_one_keeps_its_whole_records(tmp_path):
    folder = tmp_path / "tb"
    path, starts = write_events(folder)
    with open(path, "rb") as f:
        blob = f.read()
    assert len(starts) == 6 and read_scalars(str(folder)) == {"loss": {k: pytest.approx(1.0 / k) for k in range(1, 6)}}
    for pos, words in ((starts[3] + 16, "its bytes do not match their CRC"),  # the payload of step 3's record
                       (starts[3] + 1, "its length does not match its CRC"),  # its length
                       (starts[5] - 2, "its bytes do not match their CRC")):  # step 4's payload CRC
        damaged = flipped(blob, pos, 0)
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(NCSNError) as e:
            read_scalars(str(folder))
        message = str(e.value)
        assert f"TensorBoard file {path} is damaged: the record at byte" in message and words in message
        assert f"move the file out of {folder}" in message and "\n" not in message
        with open(path, "rb") as f:
            assert f.read() == damaged
    for cut, steps in ((blob[:starts[5] + 10], 4), (blob[:starts[5]] + bytes(40), 4), (blob[:starts[1] - 1], 0)):
        with open(path, "wb") as f:  # a crash while writing: the whole records before it are read
            f.write(cut)
        assert sorted(read_scalars(str(folder)).get("loss", {})) == list(range(1, steps + 1))


def test_the_notebook_reads_through_the_functions_tested_here():
    import json

    with open(os.path.join(REPO, "report.ipynb")) as f:
        code = "".join("".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code")
    assert "read_scalars(TB_DIR)" in code and "read_metrics(" in code and "load_config(" in code
    assert "json.load" not in code and "yaml.safe_load" not in code
