"""Shared helpers: tiny MNIST-format files written by the tests, tiny configs, one tiny run trained once per
pytest run, and running main.py.

A test stays fast when it calls main.main(argv) in this process (a new interpreter pays 2-4 s of imports before
it does anything) and starts from the session's tiny run (copy_tiny_run) instead of training its own; a
subprocess is for what only a process shows: its exit status, a signal, a fresh interpreter, torchrun."""
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# One CPU thread for torch, here and in every process a test starts (they inherit the variable): the tiny
# networks of the tests are bound by per-op overhead, not arithmetic, and with two threads a test slows down
# several times over whenever another process takes one of the cores (the threads wait for each other).
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it starts its thread pool)

torch.set_num_threads(1)
# Inductor's compile cache does not tell apart kernels built for AVX-512 and for AVX2 (ATEN_CPU_CAPABILITY=avx2
# emulates the other kind on one machine): a run under one reused the other's and computed garbage. One cache per
# kind, kept between runs, unless the caller chose a cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_ncsn_tests_{torch.backends.cpu.get_cpu_capability()}"))

# fast.auto's cache of timed speed paths (speedpath.py): one for the tests, never the user's.
os.environ["NCSN_SPEED_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="ncsn_speed_"), "speed_paths.json")

# Every test runs on the CPU, also on a host with a GPU: the figures they compare (bitwise resume, the CPU's
# sample counts, gloo under torchrun) are the CPU's. Each call of main.py passes CPU; the tests that need CUDA
# are in tests/test_cuda.py, marked `cuda` and skipped where torch sees no GPU.
CPU = ("--device", "cpu")


def sets(*items):
    """--set for each "key=value" of `items`."""
    return [w for item in items for w in ("--set", item)]


def cli(capsys, tmp_path, *args):
    """main.main(args) with --run tmp_path/run: (exit status, ERROR lines, WARNING lines, stdout, stderr)."""
    import main
    capsys.readouterr()
    code = main.main([*CPU, "--run", str(tmp_path / "run"), *map(str, args)])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    return (code, [x for x in lines if x.startswith("ERROR")], [x for x in lines if x.startswith("WARNING")], out,
            err)


def write_idx(path, array):
    """Write a uint8 array in LeCun's IDX format (magic 0x0000080N, big-endian dims)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x800 + array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def write_fake_mnist(root, n_train=64, n_test=32, seed=0):
    """Blurry random digits-like blobs in <root>/MNIST/raw, read later through torchvision's MNIST."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for k in range(n):  # a bright rectangle at a random place: structured, not uniform noise
            r, c = rng.integers(4, 14, size=2)
            images[k, r:r + 10, c:c + 6] = rng.integers(128, 256)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, size=n))
    return root


def tiny_config(data_root, **overrides):
    """A config dict for a model that trains in seconds on the CPU; overrides as {'training.n_iters': 5}."""
    with open(os.path.join(REPO, "config.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["training"].update(batch_size=8, n_iters=6, snapshot_freq=3, test_freq=2, log_freq=2)
    cfg["data"]["root"] = str(data_root)
    cfg["model"].update(ngf=4, num_classes=4)
    cfg["sampling"].update(n_steps_each=2, n_samples=4, batch_size=4, n_frames=4)
    cfg["fast"]["auto"] = False  # the path config.yml pins: a timed choice could differ between two runs of a test
    for key, value in overrides.items():
        section, name = key.split(".")
        if value is None:
            del cfg[section][name]
        else:
            cfg.setdefault(section, {})[name] = value
    return cfg


def write_config(path, cfg):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def train_off_and_on(tmp_path, data_root, switches):
    """A tiny run with EMA trained 4 steps twice, as runs 'False' and 'True' under tmp_path/run: with each config
    key of `switches` false, then true. Returns (the run root, {False: checkpoint dict, True: checkpoint dict})."""
    import main
    import torch
    run, ckpts = str(tmp_path / "run"), {}
    for flag in (False, True):
        cfg = tiny_config(data_root, **{"training.n_iters": 4, "model.ema": True, **{k: flag for k in switches}})
        assert main.main([*CPU, "--config", write_config(tmp_path / f"{flag}.yml", cfg), "--run", run,
                          "--doc", str(flag)]) == 0
        ckpts[flag] = torch.load(tmp_path / "run" / "logs" / str(flag) / "checkpoint.pth", weights_only=True)
    return run, ckpts


def graph_counter():
    """A torch.compile backend that runs the captured graphs as they are (no inductor, no kernels to generate)
    and keeps them: (backend, list of graphs). A test shows with it that compiled code was used."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def count_compile_norms(monkeypatch):
    """Make CondRefineNetDilated.compile_norms compile through graph_counter's backend (dynamo's graphs run as they
    are, no kernels generated) and record its calls: returns (the options of each call, the graphs that ran)."""
    from model import CondRefineNetDilated
    calls, (backend, graphs) = [], graph_counter()
    compile_norms = CondRefineNetDilated.compile_norms

    def counted(self, **options):
        calls.append(options)
        return compile_norms(self, **{**options, "backend": backend})
    monkeypatch.setattr(CondRefineNetDilated, "compile_norms", counted)
    return calls, graphs


def assert_same_weights(expected, actual):
    """The model and EMA weights of two checkpoint dicts: the same keys in the same order, equal to float
    rounding."""
    import torch
    for part in ("model", "ema"):
        assert list(actual[part]) == list(expected[part])
        for key in expected[part]:
            torch.testing.assert_close(actual[part][key], expected[part][key], rtol=1e-4, atol=1e-5,
                                       msg=f"{part} {key}")


def run_main(*args, cwd, timeout=300, env=None):
    """python main.py --device cpu ARGS in `cwd`, as a user would run it; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *CPU, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def ncsn_log():
    """Messages of the "ncsn" logger (which main.setup_logging may have cut off from the root logger)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("ncsn")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def fake_mnist(tmp_path_factory):
    return write_fake_mnist(str(tmp_path_factory.mktemp("data")))


TINY_DOC = "r"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny run trained once per pytest run, to read and never to change: tiny_config's defaults (6 steps,
    checkpoint_3.pth and checkpoint_6.pth, checkpoint.pth a hard link to the newest), doc TINY_DOC, in
    <folder>/run, on the fake MNIST of <folder>/data. Returns <folder>; a test that changes the run works on a
    copy (copy_tiny_run)."""
    import main
    folder = tmp_path_factory.mktemp("tiny_run")
    data = write_fake_mnist(str(folder / "data"))
    cfg = write_config(folder / "c.yml", tiny_config(data))
    assert main.main([*CPU, "--config", cfg, "--run", str(folder / "run"), "--doc", TINY_DOC]) == 0
    return folder


def copy_tiny_run(tiny_run, run_root):
    """A copy of the session's tiny run as <run_root>/logs/TINY_DOC and <run_root>/tensorboard/TINY_DOC, with
    checkpoint.pth a hard link to checkpoint_6.pth again, as training leaves it. Returns the data root of its
    config (the session's fake MNIST, also read-only)."""
    for part in ("logs", "tensorboard"):
        shutil.copytree(tiny_run / "run" / part / TINY_DOC, os.path.join(run_root, part, TINY_DOC))
    logs = os.path.join(run_root, "logs", TINY_DOC)
    os.remove(os.path.join(logs, "checkpoint.pth"))
    os.link(os.path.join(logs, "checkpoint_6.pth"), os.path.join(logs, "checkpoint.pth"))
    return str(tiny_run / "data")


def snapshot_tree(folder):
    """{relative path: (size, mtime_ns, bytes)} of every file below `folder`, to show nothing changed."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, f.read())
    return out


def event_files(tb_dir):
    """The TensorBoard event files in `tb_dir` (names only)."""
    return {f for f in os.listdir(tb_dir) if "tfevents" in f} if os.path.isdir(tb_dir) else set()


def scalars_of_new_event_files(tb_dir, before, tmp):
    """{tag: {step: value}} of only the event files in `tb_dir` that are not in `before` (the files written by
    one later process), read with common.read_scalars from a folder `tmp` holding copies of just those."""
    import shutil

    from common import read_scalars

    new = sorted(event_files(tb_dir) - set(before))
    os.makedirs(tmp, exist_ok=False)
    for name in new:
        shutil.copy(os.path.join(tb_dir, name), os.path.join(tmp, name))
    return new, read_scalars(tmp)


class FakeClock:
    """The `time` module of the modules that keep time for training (runner, bookkeeping, progress), so that a
    test of a time budget or of progress lines asserts their logic, not this machine's speed: time() and
    perf_counter() read `now`, which moves only by advance(seconds) (or sleep) and by `tick` after each
    perf_counter() call, so that each span timed with two calls (a network evaluation) takes `tick` seconds. The
    default values are binary fractions: sums of them are exact. Anything else is the real module's."""

    def __init__(self, now=1024.0, tick=0.0):
        self.now, self.tick = now, tick

    def time(self):
        return self.now

    def perf_counter(self):
        t = self.now
        self.now += self.tick
        return t

    def advance(self, seconds):
        self.now += seconds

    sleep = advance

    def __getattr__(self, name):
        import time
        return getattr(time, name)


def fake_clock(monkeypatch, now=1024.0, tick=0.0):
    """A FakeClock as the `time` of runner.py, bookkeeping.py and progress.py for this test."""
    import bookkeeping
    import progress
    import runner
    clock = FakeClock(now, tick)
    for module in (runner, bookkeeping, progress):
        monkeypatch.setattr(module, "time", clock)
    return clock
