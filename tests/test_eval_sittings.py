"""--eval in sittings: the samples drawn so far survive a stop (eval.max_minutes, a kill) in the run folder, and the
same --eval goes on from them to the samples and scores of an --eval that was never stopped."""
import os

import pytest
import torch

import evaluate
import main
import metrics
import runner
from conftest import CPU, TINY_DOC, FakeClock, copy_tiny_run, sets

N, BATCH = 12, 4  # --eval's samples in three sampling batches
EVAL_SETS = sets(f"eval.n_samples={N}", f"sampling.batch_size={BATCH}", "eval.loss_images=8")


@pytest.fixture
def scored(monkeypatch):
    """A fixed classifier (seeded weights) in place of the trained one, and the samples each --eval scores."""
    torch.manual_seed(0)
    classifier = metrics.DigitClassifier().eval()
    monkeypatch.setattr(metrics, "classifier_on_every_rank", lambda data_root, device, run: classifier)
    seen, real = [], metrics.sample_metrics

    def sample_metrics(images, *args, **kwargs):
        seen.append(images.clone())
        return real(images, *args, **kwargs)
    monkeypatch.setattr(metrics, "sample_metrics", sample_metrics)
    return seen


def eval_cli(root, *args):
    return main.main([*CPU, "--run", str(root), "--doc", TINY_DOC, "--eval", *EVAL_SETS, *map(str, args)])


def records(root):
    import json
    with open(os.path.join(root, "logs", TINY_DOC, "metrics.json")) as f:
        return json.load(f)


def partial(root):
    return os.path.join(root, "logs", TINY_DOC, "eval_partial_6.pt")  # the tiny run's checkpoint is at step 6


def test_a_killed_eval_goes_on_to_the_samples_of_an_unbroken_one(tmp_path, tiny_run, scored, monkeypatch):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    copy_tiny_run(tiny_run, str(whole))
    copy_tiny_run(tiny_run, str(broken))
    assert eval_cli(whole) == 0
    assert not os.path.exists(partial(whole))  # removed once the scores are written
    unbroken = scored.pop()

    chains, real = [], runner.run_sampler

    def killed_at_the_third_batch(*args, **kwargs):
        chains.append(1)
        if len(chains) == 3:
            raise KeyboardInterrupt  # as a kill between two saves
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "run_sampler", killed_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        eval_cli(broken)
    kept = torch.load(partial(broken), weights_only=True)
    assert kept["samples"].shape == (2 * BATCH, 1, 28, 28) and kept["sittings"] == 1
    assert not os.path.exists(os.path.join(broken, "logs", TINY_DOC, "metrics.json"))

    monkeypatch.setattr(runner, "run_sampler", real)
    chains.clear()
    assert eval_cli(broken) == 0
    assert torch.equal(scored.pop(), unbroken)  # the same N samples, bit for bit
    a, b = records(whole)[-1], records(broken)[-1]
    assert (a["fid"], a["kid"], a["inception_score"]) == (b["fid"], b["kid"], b["inception_score"])
    assert a["sampling_sittings"] == 1 and b["sampling_sittings"] == 2
    assert not os.path.exists(partial(broken))


def test_eval_max_minutes_stops_at_a_batch_and_the_next_eval_finishes(tmp_path, tiny_run, scored, monkeypatch,
                                                                        capsys):
    """Each sampling batch takes 60 s of a fake clock; 2.5 minutes end the draw after two batches (a third would
    pass the limit), with exit 0, no scores and the 8 samples kept; the same --eval draws the last batch."""
    root = tmp_path / "run"
    copy_tiny_run(tiny_run, str(root))
    clock, real = FakeClock(), runner.run_sampler
    monkeypatch.setattr(evaluate, "time", clock)

    def a_minute_a_batch(*args, **kwargs):
        clock.advance(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "run_sampler", a_minute_a_batch)
    assert eval_cli(root, "--set", "eval.max_minutes=2.5") == 0
    assert torch.load(partial(root), weights_only=True)["samples"].shape[0] == 2 * BATCH
    assert not scored and not os.path.exists(os.path.join(root, "logs", TINY_DOC, "metrics.json"))
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("WARNING")]
    assert len(warnings) == 1 and "ended the draw at 8 of 12 samples" in warnings[0], warnings
    assert eval_cli(root, "--set", "eval.max_minutes=2.5") == 0
    assert len(scored.pop()) == N and records(root)[-1]["sampling_sittings"] == 2
    assert records(root)[-1]["sampling_seconds"] == 180  # three batches of the fake clock, over both sittings


def test_samples_of_another_eval_or_a_damaged_file_are_refused_and_kept(tmp_path, tiny_run, scored, monkeypatch,
                                                                         capsys):
    root = tmp_path / "run"
    copy_tiny_run(tiny_run, str(root))
    real = runner.run_sampler

    def one_batch_only(*args, **kwargs):
        if not hasattr(one_batch_only, "done"):
            one_batch_only.done = True
            return real(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run_sampler", one_batch_only)
    with pytest.raises(KeyboardInterrupt):
        eval_cli(root)
    monkeypatch.setattr(runner, "run_sampler", real)
    with open(partial(root), "rb") as f:
        before = f.read()
    capsys.readouterr()
    for other in (["--seed", "2"], ["--set", "sampling.n_steps_each=3"], ["--set", "eval.n_samples=16"]):
        assert eval_cli(root, *other) == 1
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ERROR")]
        assert len(errors) == 1 and "eval_partial_6.pt holds samples of another --eval" in errors[0], errors
        assert "move the file away" in errors[0]
    with open(partial(root), "rb") as f:
        assert f.read() == before  # refused, never overwritten
    with open(partial(root), "wb") as f:
        f.write(before[: len(before) // 2])  # cut short
    assert eval_cli(root) == 1
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ERROR")]
    assert len(errors) == 1 and "cannot be read as --eval's samples drawn so far" in errors[0], errors
    assert os.path.getsize(partial(root)) == len(before) // 2
    assert not scored
