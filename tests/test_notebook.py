"""report.ipynb: executed headless with nbclient against a tiny run, and kept free of outputs in git.

nbclient and nbformat are imported inside the tests (skipped where they are missing), so that collecting this
module never fails: `pytest -m cuda` on a GPU machine without them imports every test module first."""
import json
import os
import re
import shutil

import pytest

import main
from conftest import CPU, REPO, TINY_DOC, copy_tiny_run

NOTEBOOK = os.path.join(REPO, "report.ipynb")


def notebook_modules():
    """(nbclient, nbformat), or the test is skipped where they are not installed."""
    return pytest.importorskip("nbclient"), pytest.importorskip("nbformat")


def read_notebook():
    return notebook_modules()[1].read(NOTEBOOK, as_version=4)


def execute(nb, run, doc, image_folder):
    """Point the notebook's parameters cell (tagged 'parameters') at the run and execute it in the repo root."""
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "report.ipynb needs exactly one cell tagged 'parameters'"
    params[0].source = f"RUN = {str(run)!r}\nDOC = {doc!r}\nIMAGE_FOLDER = {str(image_folder)!r}"
    client = notebook_modules()[0].NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": REPO}})
    client.execute()
    return nb


def outputs(nb, kind):
    """Outputs of the executed notebook: the 'image/png' ones, or the text of the stream ones."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "image/png" and "image/png" in out.get("data", {}):
                found.append(out["data"]["image/png"])
            elif kind == "stream" and out.get("output_type") == "stream":
                found.append(out["text"])
    return found


@pytest.fixture(scope="module")
def nb_run(tmp_path_factory, tiny_run):
    """A copy of the session's tiny run (6 steps on fake MNIST, a test loss every 2 steps) on a copy of its data, and
    its samples."""
    notebook_modules()  # skip before sampling where the notebook cannot run
    tmp = tmp_path_factory.mktemp("nbrun")
    run, images = tmp / "run", tmp / "images"
    data = copy_tiny_run(tiny_run, run)
    shutil.copytree(data, tmp / "data")  # the notebook's scores cache a classifier beside the data: a copy's
    config = run / "logs" / TINY_DOC / "config.yml"
    config.write_text(config.read_text().replace(str(data), str(tmp / "data")))
    assert main.main([*CPU, "--run", str(run), "--doc", TINY_DOC, "--sample", "-o", str(images)]) == 0
    return run, images


def test_committed_notebook_has_no_outputs():
    nb = read_notebook()
    notebook_modules()[1].validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "report.ipynb has no code cells"
    stale = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not stale, f"code cells {stale} of report.ipynb hold outputs: clear them before committing"


@pytest.mark.slow  # a Jupyter kernel of its own: it starts and imports torch
def test_notebook_runs_on_a_tiny_run(nb_run):
    run, images = nb_run
    nb = execute(read_notebook(), run, TINY_DOC, images)
    pngs = outputs(nb, "image/png")
    # the loss curves, the training loss by level, the sample grid, the trajectory strip and the fresh samples; this
    # run has no per-level test loss or metrics
    assert len(pngs) >= 5, f"expected at least 5 plots, got {len(pngs)}"
    assert all(len(p) > 1000 for p in pngs), "an image output is suspiciously small"
    text = "".join(outputs(nb, "stream"))
    assert os.path.join(str(run), "logs", TINY_DOC) in text  # it looked at the run it was given
    assert "train_loss/raw: 6 values" in text and "test_loss/raw: 3 values" in text  # the weights in the tags
    assert len(re.findall(r"train_loss/raw/level_\d: [1-4] values", text)) == 4  # at read-backs 2, 3, 4, 6
    assert "frames shown" in text
    assert "no per-level test loss" in text and "no quality metrics" in text
    assert "step 6, 100 fresh samples: FID " in text and "KID " in text  # through ncsn.py


@pytest.mark.slow  # a Jupyter kernel of its own: it starts and imports torch
def test_notebook_plots_per_level_loss_and_metrics(nb_run):
    """The same run copied under another doc, with per-level test losses and metrics added: 5 plots."""
    run, images = nb_run
    shutil.copytree(run / "logs" / TINY_DOC, run / "logs" / "rich")
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(run / "tensorboard" / "rich")) as writer:
        for step in (2, 4, 6):
            writer.add_scalar("train_loss/raw", 400.0 / step, step)
            writer.add_scalar("test_loss/raw", 410.0 / step, step)
            for i in range(4):  # tiny_config has 4 noise levels
                writer.add_scalar(f"train_loss/raw/level_{i}", 290.0 / step + i, step)
                writer.add_scalar(f"test_loss/level_{i}", 300.0 / step + i, step)  # an older run's tag: no weights
            writer.add_scalar("metrics/fid_n100", 100.0 / step, step)
            writer.add_scalar("metrics/fid_n1000", 10.0 / step, step)  # another count: a curve of its own
    with open(run / "logs" / "rich" / "metrics.json", "w") as f:
        json.dump([{"step": 6, "n_samples": 100, "kid": 0.01, "kid_se": 0.002, "inception_score": 1.5,
                    "class_shares": [0.1] * 10}], f)
    nb = execute(read_notebook(), run, "rich", images)
    assert len(outputs(nb, "image/png")) == 6  # losses, loss by level, samples, trajectory, metrics, fresh samples
    text = "".join(outputs(nb, "stream"))
    assert text.count("skipped") == 1 and "no snapshot grids" in text  # the only plot this run cannot have
    assert "test_loss/raw/level_3: 3 values" in text and "metrics/fid_n100: 3 values" in text


@pytest.mark.slow  # a Jupyter kernel of its own: it starts and imports torch
def test_notebook_stops_on_a_missing_run(tmp_path):
    nbclient = notebook_modules()[0]
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="no run at"):
        execute(read_notebook(), tmp_path / "nowhere", "t", tmp_path / "images")


@pytest.mark.slow  # a Jupyter kernel of its own: it starts and imports torch
def test_notebook_runs_with_its_own_defaults_after_the_readme_quick_commands(fake_mnist, monkeypatch):
    """The README's two quick commands (at a tiny size, through --set; main.main in this process) in a fresh
    folder, then Run All with the notebook's parameters as committed: RUN = "run", DOC = "quick", the run's own
    samples folder."""
    work = os.path.join(REPO, "run", f"notebook_test_{os.getpid()}")  # inside the repository (run/ is ignored),
    os.makedirs(work)                                                  # so the notebook finds its code above it
    try:
        tiny = ["training.n_iters=4", "training.snapshot_freq=2", "training.snapshot_grid=4", "model.ngf=4",
                "model.num_classes=4", "sampling.n_steps_each=2", "sampling.n_samples=4", "sampling.batch_size=4",
                "sampling.n_frames=4", "training.batch_size=8", "fast.compile_norms=false", f"data.root={fake_mnist}"]
        sets = [w for s in tiny for w in ("--set", s)]
        monkeypatch.chdir(work)
        for argv in (["--config", os.path.join(REPO, "configs", "quick.yml"), "--doc", "quick", *sets],
                     ["--doc", "quick", "--sample"]):
            assert main.main([*CPU, *argv]) == 0, argv
        monkeypatch.undo()
        nb = read_notebook()
        nbclient = notebook_modules()[0]
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": work}})
        client.execute()
        text = "".join(outputs(nb, "stream"))
        assert os.path.join(work, "run", "logs", "quick") in text
        assert "frames shown" in text and "2 snapshot grids" in text
        assert len(outputs(nb, "image/png")) >= 4  # losses, samples, trajectory, snapshot grids
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # a Jupyter kernel of its own: it starts and imports torch
def test_notebook_says_in_one_line_which_file_is_damaged_and_plots_the_rest(nb_run):
    """A flipped bit in the run's TensorBoard file and a truncated metrics.json: one line each, the other plots."""
    run, images = nb_run
    shutil.copytree(run / "logs" / TINY_DOC, run / "logs" / "damaged")
    shutil.copytree(run / "tensorboard" / TINY_DOC, run / "tensorboard" / "damaged")
    tb = run / "tensorboard" / "damaged"
    name = max(os.listdir(tb), key=lambda f: os.path.getsize(tb / f))  # the training loss's file
    blob = bytearray((tb / name).read_bytes())
    blob[len(blob) // 2] ^= 1  # inside some record: its bytes or its length no longer match their CRC
    (tb / name).write_bytes(bytes(blob))
    (run / "logs" / "damaged" / "metrics.json").write_text('[{"step": 6, "fid": 8')
    nb = execute(read_notebook(), run, "damaged", images)
    text = "".join(outputs(nb, "stream"))
    assert f"no TensorBoard scalars: TensorBoard file {tb / name} is damaged" in text
    assert "metrics.json not shown: " in text and "is damaged or truncated, not JSON" in text
    assert "no 'train_loss/raw' scalars: the training (raw weights) loss is not shown" in text
    # the loss figure (its s = 0 line only), the samples, the trajectory, the fresh samples drawn through ncsn.py
    assert len(outputs(nb, "image/png")) == 4
