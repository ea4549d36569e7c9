"""training.stratified_levels: every level gets the same share of each global batch (B // L images, the remainder
to levels drawn at random), in a random order, drawn from the training generator like the paper's random levels."""
import pytest
import torch

import main
import runner
from conftest import CPU, tiny_config, write_config
from data import batch_noise, stratified_levels


@pytest.mark.parametrize("batch,levels", [(64, 10), (30, 10), (7, 4), (3, 10), (10, 1)])
def test_every_level_gets_its_exact_share(batch, levels):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        _, labels, _ = batch_noise(g, batch, levels, "cpu", stratified=True)
        counts = torch.bincount(labels, minlength=levels)
        assert labels.shape == (batch,) and counts.sum() == batch
        assert counts.min() == batch // levels and counts.max() <= batch // levels + 1
        assert (counts == batch // levels + 1).sum() == batch % levels


def test_remainder_and_order_are_random_and_reproducible():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_levels(g, 64, 10, "cpu") for _ in range(200)])  # (200, 64)
    extra = torch.stack([torch.bincount(d, minlength=10) for d in draws]) == 7  # (200, 10): who had the remainder
    assert extra.sum(1).eq(4).all()
    assert extra.float().mean(0).min() > 0.25  # every level gets one of the 4 extra images, ~40% of the time
    # positions are shuffled: the level at a position varies, and no draw repeats the last
    assert len(set(draws[:, 0].tolist())) == 10 and not any(torch.equal(a, b) for a, b in zip(draws, draws[1:]))
    # the same generator state gives the same batch: u, levels and z
    a = batch_noise(torch.Generator().manual_seed(5), 64, 10, "cpu", stratified=True)
    b = batch_noise(torch.Generator().manual_seed(5), 64, 10, "cpu", stratified=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def train(tmp_path, cfg, doc, *extra):
    return main.main([*CPU, "--config", write_config(tmp_path / f"{doc}.yml", cfg), "--run", str(tmp_path / "run"),
                      "--doc", doc, *extra])


def test_training_steps_use_stratified_levels(tmp_path, fake_mnist, monkeypatch):
    seen = []
    dsm_loss = runner.dsm_loss

    def recording(*args, labels=None, **kwargs):
        if labels is not None:  # the training step passes the levels it drew; the test loss draws its own
            seen.append(labels.clone())
        return dsm_loss(*args, labels=labels, **kwargs)

    monkeypatch.setattr(runner, "dsm_loss", recording)
    # batch 8 at 4 levels: 2 images of each level in every step (64 fake images: 8 full batches an epoch)
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.stratified_levels": True})
    assert train(tmp_path, cfg, "strat") == 0
    assert len(seen) == 6
    for labels in seen:
        assert torch.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]
    assert len({tuple(labels.tolist()) for labels in seen}) == 6  # in a new order every step


def test_resume_refuses_a_change_of_stratified_levels(tmp_path, fake_mnist, capsys):
    cfg = tiny_config(fake_mnist, **{"training.n_iters": 3, "training.snapshot_freq": 3})
    assert train(tmp_path, cfg, "r") == 0
    more = tiny_config(fake_mnist, **{"training.n_iters": 6, "training.stratified_levels": True})
    assert train(tmp_path, more, "r", "--resume_training") == 1
    assert "differs from the checkpoint's in training.stratified_levels" in capsys.readouterr().err
