"""Is a tiny run bitwise the same as the one an older commit makes? Trains 6 steps, resumes to 12 (snapshots every
5) and samples, once with the code of COMMIT (unpacked from git into a temporary folder) and once with this working
tree, on the same fake MNIST files and configs; then compares every checkpoint's entries (tensors with torch.equal
and their dtypes, the rest with ==) and the bytes of samples.pt, samples.png and movie.gif.

    .venv/bin/python bench/same_run.py COMMIT

Prints one line per compared file and exits 1 if anything differs.
"""
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

from conftest import tiny_config, write_config, write_fake_mnist  # noqa: E402


def tiny_run(code, out, work, data):
    """Train, resume and sample with main.py of the tree `code` into the folder `out`; returns the run's log folder
    and the sample folder."""
    os.makedirs(out)
    cfgs = [write_config(os.path.join(work, f"c{n}.yml"), tiny_config(data, **{"training.n_iters": n,
                                                                                "training.snapshot_freq": 5}))
            for n in (6, 12)]
    run = os.path.join(out, "run")
    for cfg, extra in ((cfgs[0], []), (cfgs[1], ["--resume_training"]), (None, ["--sample", "-o", f"{out}/s"])):
        subprocess.run([sys.executable, os.path.join(code, "main.py"), "--device", "cpu", "--run", run, "--doc", "t",
                        *(["--config", cfg] if cfg else []), *extra], check=True, cwd=out, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return os.path.join(run, "logs", "t"), os.path.join(out, "s")


def entries(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from entries(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from entries(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def differences(a, b):
    ea, eb = dict(entries(a)), dict(entries(b))
    if ea.keys() != eb.keys():
        return sorted(set(ea) ^ set(eb))
    return [k for k in ea if (not (torch.is_tensor(eb[k]) and ea[k].dtype == eb[k].dtype and torch.equal(ea[k], eb[k]))
                              if torch.is_tensor(ea[k]) else ea[k] != eb[k])]


def main():
    commit = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        old = os.path.join(work, "old")
        os.makedirs(old)
        archive = subprocess.run(["git", "-C", REPO, "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        data = write_fake_mnist(os.path.join(work, "data"))
        (old_logs, old_s), (new_logs, new_s) = tiny_run(old, os.path.join(work, "a"), work, data), \
            tiny_run(REPO, os.path.join(work, "b"), work, data)
        names = sorted(f for f in os.listdir(old_logs) if f.endswith(".pth"))
        bad = 0
        if names != sorted(f for f in os.listdir(new_logs) if f.endswith(".pth")):
            print("the runs wrote different checkpoint files")
            bad += 1
        for name in names:
            diff = differences(torch.load(os.path.join(old_logs, name), weights_only=True),
                               torch.load(os.path.join(new_logs, name), weights_only=True))
            print(f"{name}: {'the same' if not diff else 'differs in ' + ', '.join(diff[:5])}")
            bad += bool(diff)
        for name in ("samples.pt", "samples.png", "movie.gif"):
            with open(os.path.join(old_s, name), "rb") as f, open(os.path.join(new_s, name), "rb") as g:
                same = f.read() == g.read()
            print(f"{name}: {'the same bytes' if same else 'differs'}")
            bad += not same
    print(f"{commit} against the working tree: {'bitwise the same' if not bad else f'{bad} files differ'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
