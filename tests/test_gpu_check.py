"""bench/gpu_prepare.sh and bench/gpu_check.sh rehearsed on the CPU the way the GPU machine will run them: a
Python without tensorboardX, nbclient and nbformat (tests/hide_modules hides the venv's copies), the wheel and
the MNIST files only from the carried folder that the preparation step made, CUDA hidden (CUDA_VISIBLE_DEVICES
empty), so that the CUDA tests the check runs are skipped rather than run inside this CPU test. No network:
the wheel is built here from the installed tensorboardX, and pip takes it from that folder alone."""
import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, write_fake_mnist

HIDE = os.path.join(REPO, "tests", "hide_modules")
MNIST_FILES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
               "train-labels-idx1-ubyte"]
TBX_VERSION = importlib.metadata.version("tensorboardX")
# The rehearsal's train part: SIGTERM at 3/4 of it (18 s), well after a main.py process has its handlers in
# place (about 8 s after it starts on a slow CPU), and the classifier beside it needs about 10 s here: on a
# CPU half as fast it still finishes within the box.
TRAIN_S = 24


def wheel_from_installed(name, folder):
    """A wheel of the installed distribution `name`: its files as its RECORD lists them, zipped (pure Python)."""
    dist = importlib.metadata.distribution(name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{dist.metadata['Name']}-{dist.version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files:
            if str(f).startswith("..") or "__pycache__" in str(f):
                continue
            z.write(dist.locate_file(f), str(f))
    return path


def prepare(src, out, links):
    return subprocess.run(["bash", f"{REPO}/bench/gpu_prepare.sh", str(src), "--out", str(out), "--find_links",
                           str(links)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})


def without_modules(**extra):
    """The environment of a Python that lacks tensorboardX, nbclient and nbformat, CUDA hidden."""
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": HIDE, "HIDE_MODULES": "tensorboardX,nbclient,nbformat",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    """gpu_prepare.sh's folder from fake MNIST files (one of them only as .gz, one with a stray .gz beside it) and
    a wheelhouse holding the tensorboardX wheel; returns (carry folder, source raw folder, prepare's result)."""
    tmp = tmp_path_factory.mktemp("carry")
    raw = os.path.join(write_fake_mnist(str(tmp / "src")), "MNIST", "raw")
    with open(os.path.join(raw, "t10k-labels-idx1-ubyte"), "rb") as f, \
            gzip.open(os.path.join(raw, "t10k-labels-idx1-ubyte.gz"), "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(os.path.join(raw, "t10k-labels-idx1-ubyte"), tmp / "t10k-labels-idx1-ubyte.original")
    os.remove(os.path.join(raw, "t10k-labels-idx1-ubyte"))  # only the .gz is there
    with open(os.path.join(raw, "train-labels-idx1-ubyte"), "rb") as f, \
            gzip.open(os.path.join(raw, "train-labels-idx1-ubyte.gz"), "wb") as g:
        shutil.copyfileobj(f, g)  # both forms: the raw one is copied, the .gz stays behind
    wheel_from_installed("tensorboardX", str(tmp / "wheelhouse"))
    p = prepare(raw, tmp / "gpu_carry", tmp / "wheelhouse")
    return tmp / "gpu_carry", raw, p


def test_prepare_lays_out_the_four_raw_files_and_the_wheel(carried, tmp_path):
    carry, raw, p = carried
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(carry)) == ["MNIST", "wheels"]
    assert sorted(os.listdir(carry / "MNIST" / "raw")) == MNIST_FILES  # no .gz travels
    for name in MNIST_FILES:
        original = os.path.join(raw, name) if name != "t10k-labels-idx1-ubyte" else \
            carry.parent / "t10k-labels-idx1-ubyte.original"  # decompressed from the .gz
        with open(original, "rb") as a, open(carry / "MNIST" / "raw" / name, "rb") as b:
            assert a.read() == b.read(), name
    (wheel,) = os.listdir(carry / "wheels")
    assert wheel.lower() == f"tensorboardx-{TBX_VERSION}-py3-none-any.whl"
    assert "needs numpy, packaging, protobuf" in p.stdout and "of the 64 MiB that travel" in p.stdout
    assert "bash bench/gpu_check.sh --carry" in p.stdout
    # a folder without the MNIST files: one line naming the missing file, nothing made
    empty = tmp_path / "nothing"
    empty.mkdir()
    bad = prepare(empty, tmp_path / "out", carry.parent / "wheelhouse")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "train-images-idx3-ubyte" in bad.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow  # a pytest process that imports every test module
def test_the_hiding_is_real_and_pytest_m_cuda_collects_without_nbclient():
    """The rehearsal's environment lacks what the GPU machine lacks; there, `pytest -m cuda` imports every test
    module first, and none may need nbclient or nbformat to be collected."""
    env = without_modules()
    for name in ("tensorboardX", "nbclient", "nbformat"):
        p = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env)
        assert p.returncode == 1 and "hidden by tests/hide_modules" in p.stderr, name
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only", "-p",
                        "no:cacheprovider", "tests"], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]  # "3/210 tests collected (207 deselected) in 9.5s": no "N errors"
    assert "tests collected" in last and "error" not in last, last
    assert "tests/test_cuda.py" in p.stdout


def repo_state():
    """What git sees in the repository, ignored files included (bytecode caches aside, and the folder that
    tests/test_notebook.py works in for a few seconds, which pytest -n may run at the same time as this)."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(line for line in out if "__pycache__" not in line and ".pytest_cache" not in line and
                  "run/notebook_test_" not in line)


@pytest.mark.slow  # every part of the check, each a process of its own, and a training time box
def test_gpu_check_rehearsal_from_the_carried_folder(carried, tmp_path):
    """bench/gpu_check.sh --tiny with the carried folder in a Python without tensorboardX: every part runs and
    reports its time, training runs into its (shortened) time box and is stopped by SIGTERM, the checkpoint it
    wrote is sampled and scored with its step, and everything lands in --out (8 flat files) and --work, none
    of it in the repository."""
    carry, _, p = carried
    assert p.returncode == 0, p.stderr
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()  # as the GPU machine's $OUT: there, empty
    cmd = ["bash", f"{REPO}/bench/gpu_check.sh", "--tiny", "--carry", str(carry), "--out", str(out), "--work",
           str(work)]
    before = repo_state()
    check = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env=without_modules(STEPS="100000", TRAIN_S=str(TRAIN_S)))
    text = check.stdout
    assert check.returncode == 0, text[-4000:] + check.stderr[-3000:]
    assert repo_state() == before  # nothing written into the repository
    assert f"tensorboardX {TBX_VERSION} from {work}/pylib" in text  # the carried wheel, not the venv's
    assert "torch " in text and "no GPU" in text
    for part in ("tests", "speed", "train", "sample", "eval"):
        assert f"-- {part}: " in text, part
    assert "-- extra: skipped" in text
    assert sorted(os.listdir(out)) == ["check.log", "config.yml", "metrics.json", "movie.gif", "samples.png",
                                       "speed.txt", "summary.txt", "tests.xml"]
    summary = (out / "summary.txt").read_text()
    assert summary in text and summary in (out / "check.log").read_text()
    rows = {line.split()[0]: line for line in summary.splitlines()[2:] if line and not line.startswith(("train:", "eval:"))}
    for part in ("setup", "tests", "speed", "classifier", "sample", "eval"):
        assert " ok" in rows[part], rows[part]
    assert "time box reached (SIGTERM)" in rows["train"]
    assert int(rows["train"].split()[-2]) <= TRAIN_S  # the part's seconds within its box
    stopped = [line for line in summary.splitlines() if line.startswith("train: stopped at step")]
    assert len(stopped) == 1, summary
    step = int(stopped[0].split()[4])
    assert 0 < step < 100000
    (record,) = json.loads((out / "metrics.json").read_text())
    assert record["step"] == step and record["n_samples"] == 4
    assert f"eval: step {step}, 4 samples: FID" in summary
    assert 'skipped="3"' in (out / "tests.xml").read_text()  # test_cuda.py's three, CUDA hidden
    assert "| 4 | fast / plain |" in (out / "speed.txt").read_text()
    import yaml
    assert yaml.safe_load((out / "config.yml").read_text())["data"]["root"] == str(carry)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=without_modules())
    assert again.returncode == 2 and "exists from an earlier check" in again.stderr
