"""The README works as written: every `main.py` command of its bash blocks, in the order they appear, on a tiny run
(sizes lowered by --set, the authors' import pointed at the ngf-4 fixture), each exits 0; torchrun where it runs."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import main
from conftest import CPU, REPO
from test_docs import readme

TINY = ["training.n_iters=4", "training.snapshot_freq=2", "training.test_freq=2", "training.batch_size=8",
        "training.snapshot_grid=4", "model.ngf=4", "model.num_classes=4", "sampling.n_steps_each=2",
        "sampling.n_samples=10", "sampling.batch_size=10", "sampling.n_frames=3", "eval.n_samples=10",
        "eval.loss_images=8", "fast.compile_norms=false"]
# numbers of the README's commands that a tiny run replaces with its own
TINY_FOR = {"training.n_iters=4000": "training.n_iters=6", "1000": "2"}
AUTHORS = [os.path.join(REPO, "tests", "fixtures", "authors_ncsn_ngf4", "run", "logs", "mnist_ngf4"),
           os.path.join(REPO, "..", "shared", "fixtures", "authors_ncsn_small", "run", "logs", "mnist_ngf4")]


def readme_lines():
    """Every command line of the README's ```bash blocks that runs main.py, as words, in order."""
    import re
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "main.py" in words:
                lines.append(words)
    return lines


def tiny(words, data):
    """The README's command made tiny: its numbers replaced (TINY_FOR), the authors' folder pointed at the fixture,
    and the sizes and the data set by --set where the command takes a config (a new run, --show_config,
    --noise_design)."""
    authors = next((p for p in AUTHORS if os.path.isdir(p)), None)
    out = []
    for w in words:
        w = TINY_FOR.get(w, w)
        out.append(authors if w == "/path/to/run/logs/MNIST_DOC" and authors else w)
    if "--config" in out and "--resume_training" not in out:
        out += [x for s in TINY for x in ("--set", s)]
    if "--config" in out or "--resume_training" in out:
        out += ["--set", f"data.root={data}"]
    return out


@pytest.mark.slow  # torchrun, and every command of the README
def test_every_readme_command_runs_in_order(tmp_path, fake_mnist, monkeypatch, capsys):
    lines = readme_lines()
    assert len(lines) >= 15 and lines[0][-4:] == ["--config", "config.yml", "--doc", "mnist"]
    for name in ("config.yml", "configs"):  # the README's commands run in a copy of the repository's root
        (shutil.copytree if name == "configs" else shutil.copy)(os.path.join(REPO, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    if not any(os.path.isdir(p) for p in AUTHORS):
        pytest.skip("no authors' fixture (tests/fixtures/authors_ncsn_ngf4 or ../shared)")
    for words in lines:
        argv = tiny(words[words.index("main.py") + 1:], fake_mnist)
        if words[0] == "torchrun":
            cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), *words[1:words.index("main.py")],
                   os.path.join(REPO, "main.py"), *CPU, *argv]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert p.returncode == 0, (" ".join(words), p.stderr[-3000:])
            continue
        capsys.readouterr()
        code = main.main([*CPU, *argv])
        assert code == 0, (" ".join(words), capsys.readouterr().err[-3000:])
    logs = tmp_path / "run" / "logs"
    assert {"mnist", "quick", "q2", "authors", "mnist2"} <= set(os.listdir(logs))
    assert {"samples", "samples_ckpt2", "samples_digit3", "inpaint"} <= set(os.listdir(logs / "quick"))
