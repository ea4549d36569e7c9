"""--eval: sample quality and per-level test loss of a trained run, and the same scores during training.

Its own module: it joins the method (runner.py) to the metrics (metrics.py) and writes metrics.json; the
training loop knows nothing of it and only calls the `TrainingMetrics` hook that main.py hands it.
"""
import dataclasses
import hashlib
import json
import logging
import os
import time

import torch

import metrics
from build import WEIGHTS, read_trained, sampling_weights, trained_network
from common import NCSNError, atomic_save_image, atomic_torch_save, atomic_write_bytes, derive_seed, read_metrics
from data import data_space, dequantize, load_mnist
from progress import Progress, duration
from runner import draw_samples, dsm_loss, sampling_generator

log = logging.getLogger("ncsn")
LOSS_BATCH = 500  # test images per forward pass of the per-level loss
EVAL_GRID = 100  # --eval writes the first this many samples as eval_samples_<step>.png
NEAREST_TEST_IMAGES = 1000  # held-out test images whose nearest training images are the copy check's reference
NEAREST_GRID = 50  # nearest.png shows this many samples (the closest to the training set) ...
NEAREST_PAIRS_A_ROW = 5  # ... as (sample, nearest training image) pairs, this many a row
PARTIAL_FORMAT = 1  # the layout of eval_partial_<step>.pt (EvalSittings)
NOT_DRAWING = ("n_samples", "n_frames", "guidance_scale")  # sampling settings that --eval's samples do not depend on


def test_loss_per_level(score_fn, to_model, test_u8, sigmas, anneal_power, seed, batch_size=LOSS_BATCH, desc=None):
    """The DSM loss (eq. 6) of the test images at each noise level separately: a list of L floats. With `desc`,
    progress in batches under that name."""
    out, n_batches = [], -(-len(test_u8) // batch_size)
    with Progress(len(sigmas) * n_batches, desc or "", "batches", enabled=desc is not None) as progress:
        for i in range(len(sigmas)):
            g = torch.Generator(test_u8.device).manual_seed(derive_seed(seed, "test_level", i))
            total = 0.0
            with torch.no_grad():
                for b in range(0, len(test_u8), batch_size):
                    x = to_model(dequantize(test_u8[b:b + batch_size], g))
                    labels = torch.full((len(x),), i, dtype=torch.long, device=x.device)
                    total += float(dsm_loss(score_fn, x, sigmas, g, labels=labels,
                                            anneal_power=anneal_power)[0].sum())
                    progress.update(1)
            out.append(total / len(test_u8))
    return out


SCORES = ("fid", "kid", "kid_se", "inception_score", "mean_confidence", "white_share")  # TensorBoard's scalars


def metric_tag(name, n):
    """The TensorBoard tag of a score of `n` samples: metrics/<name>_n<n> (metrics/<name> when n is not known), so
    that scores of different counts (--eval's eval.n_samples, training's eval.n_training) are never one curve."""
    return f"metrics/{name}" + (f"_n{n}" if n else "")


def record_metrics(run, record, levels=None, weights=None):
    """Append a record to <run>/logs/<doc>/metrics.json (atomically) and its scalars to TensorBoard: the scores
    under metric_tag, and the per-level test loss `levels` of the `weights` ("ema" or "raw") as
    test_loss/<weights>/level_<i>."""
    path = os.path.join(run.log_dir, "metrics.json")
    records = read_metrics(path) + [record]  # a damaged file: a one-line error, and it stays as it is
    atomic_write_bytes(path, json.dumps(records, indent=1).encode(), "free space there; the checkpoints are unchanged")
    from tensorboardX import SummaryWriter
    with SummaryWriter(run.tb_dir, filename_suffix=f".{time.time_ns()}") as writer:
        for k in SCORES:
            if record.get(k) is not None:
                writer.add_scalar(metric_tag(k, record.get("n_samples")), record[k], record["step"])
        for i, v in enumerate(levels or []):
            writer.add_scalar(f"test_loss/{weights}/level_{i}", v, record["step"])


class EvalSittings:
    """--eval's samples drawn in sittings. After each sampling batch the samples so far and the generator's state
    go atomically into eval_partial_<step>.pt in the run folder, so an --eval that stops (eval.max_minutes, a
    signal, a crash) loses at most one batch, and the same --eval again goes on from there and draws what an
    unbroken one draws (on the same machine and speed path). The file holds what it was drawn for (the checkpoint's
    weights, seed, count, sampling settings, rank); a file drawn for another --eval is refused, never overwritten.
    It is removed once the scores are written."""

    def __init__(self, run, run_cfg, ckpt, seed, n, generator, t_start):
        rank = f"_rank{run.rank}" if run.world > 1 else ""
        self.path = os.path.join(run.log_dir, f"eval_partial_{ckpt['step']}{rank}.pt")
        self.n, self.generator, self.minutes = n, generator, run_cfg.eval.max_minutes
        self.key = {"format": PARTIAL_FORMAT, "step": ckpt["step"], "weights": weights_digest(ckpt), "seed": seed,
                    "n": n, "rank": run.rank, "world": run.world,
                    "sampling": {k: v for k, v in dataclasses.asdict(run_cfg.sampling).items() if k not in NOT_DRAWING}}
        if self.minutes and run.world > 1:
            log.warning("eval.max_minutes is not applied over %d ranks (each would stop at its own sample): the "
                        "samples are still kept after each batch", run.world)
            self.minutes = 0
        self.deadline, self.seconds_before, self.sittings = t_start + 60 * self.minutes, 0.0, 1

    def done(self):
        """The samples drawn before by this --eval (None: none), with the generator set to its state after them;
        called as the draw starts."""
        self.start = self.last = time.time()
        if not os.path.exists(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            key, samples, state = saved["key"], saved["samples"], saved["generator"]
            seconds, sittings = float(saved["seconds"]), int(saved["sittings"])
        except Exception as e:  # a damaged or foreign file: named, and left as it is
            raise NCSNError(f"{self.path} cannot be read as --eval's samples drawn so far ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}): move it away "
                            f"to draw them from the start") from e
        differ = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
        if differ:
            raise NCSNError(f"{self.path} holds samples of another --eval (its {', '.join(differ)} differ): run "
                            f"that --eval again to finish it, or move the file away to draw these from the start")
        self.generator.set_state(state)
        self.seconds_before, self.sittings = seconds, sittings + 1
        log.info("eval: going on from %d of %d samples drawn before in %d sitting(s) of %s (%s)", len(samples),
                 self.n, sittings, duration(seconds), self.path)
        return samples

    def after_batch(self, samples):
        """Keep the samples so far (samples.pt's layout: the raw final tensor); True to stop the draw here, when
        eval.max_minutes would end within one more batch."""
        now = time.time()
        batch_seconds, self.last = now - self.last, now
        atomic_torch_save({"key": self.key, "samples": samples, "generator": self.generator.get_state(),
                           "seconds": self.seconds(), "sittings": self.sittings}, self.path,
                          "free space there; the samples drawn so far are in the last copy")
        return bool(self.minutes) and len(samples) < self.n and now + batch_seconds > self.deadline

    def seconds(self):
        """The draw's seconds over all its sittings so far (from the start of this sitting's draw)."""
        return self.seconds_before + time.time() - self.start

    def remove(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def weights_digest(ckpt):
    """SHA-256 of the checkpoint's weights (model and EMA), in hex: which network drew a set of samples."""
    h = hashlib.sha256()
    for part in ("model", "ema"):
        for name, t in sorted((ckpt.get(part) or {}).items()):
            if torch.is_tensor(t):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate(config, run, device, seed, ckpt_path):
    """--eval: FID, KID, Inception-style score, digit shares, white share and confidence of eval.n_samples samples
    (the same count on every device) of the checkpoint file `ckpt_path` of the run `run` (rundir.Run), drawn from
    the generator of `seed`, against the MNIST test set, and the DSM loss of the test images at each noise level
    with the sampling weights (build.sampling_weights); appended to the run's metrics.json and written to
    TensorBoard at the checkpoint's step. `config` (or None: the checkpoint's) gives the sampling and eval settings
    (build.read_trained)."""
    t_start, device = time.time(), torch.device(device)
    read_metrics(os.path.join(run.log_dir, "metrics.json"))  # a damaged one is reported before minutes of work
    run_cfg, ckpt = read_trained(ckpt_path, config)
    n, n_loss = run_cfg.eval.n_samples, run_cfg.eval.loss_images  # one count on every device: figures compare
    lo, hi = run.shard(n)
    score_fn, sigmas = trained_network(run_cfg, ckpt, ckpt_path, device, seed,
                                       min(run_cfg.sampling.batch_size, hi - lo))
    step = ckpt["step"]
    test_u8 = load_mnist(run_cfg.data.root, train=False).to(device)
    classifier = metrics.classifier_on_every_rank(run_cfg.data.root, device, run)
    reference = metrics.reference_stats(classifier, metrics.to_unit(test_u8))
    generator = sampling_generator(run, device, seed)
    sittings = EvalSittings(run, run_cfg, ckpt, seed, hi - lo, generator, t_start)
    samples = draw_samples(score_fn, sigmas, run_cfg, hi - lo, generator, device, done=sittings.done(),
                           on_batch=sittings.after_batch, desc="eval: sampling" if run.rank == 0 else None)
    if len(samples) < hi - lo:
        log.warning("eval: eval.max_minutes (%g) ended the draw at %d of %d samples, kept in %s: the same --eval "
                    "goes on from there", run_cfg.eval.max_minutes, len(samples), hi - lo, sittings.path)
        return 0
    samples, seconds = run.gather(samples), sittings.seconds()
    to_model, to_image = data_space(run_cfg)
    result = metrics.sample_metrics(to_image(samples), classifier, reference)
    levels = test_loss_per_level(score_fn, to_model, test_u8[:n_loss], sigmas, run_cfg.training.anneal_power,
                                 seed, desc="eval: test loss per level")
    weights = sampling_weights(run_cfg)
    record = {"step": step, "n_samples": n, "fid": result["fid"], "kid": result["kid"], "kid_se": result["kid_se"],
              "inception_score": result["inception_score"], "mean_confidence": result["mean_confidence"],
              "class_shares": result["class_shares"], "white_share": result["white_share"],
              "sampling_seconds": seconds, "sampling_sittings": sittings.sittings, "seed": seed, "weights": weights,
              "test_loss_per_level": levels, "test_loss_images": min(n_loss, len(test_u8))}
    log.info("step %d, %s", step, score_line(record, f" ({seconds:.0f} s)"))
    log.info("test DSM loss per level (%s weights, %d images): %s", WEIGHTS[weights], record["test_loss_images"],
             ", ".join(f"{v:.3f}" for v in levels))
    if run.rank == 0:
        record["nearest"] = nearest_check(run_cfg.data.root, to_image(samples), test_u8, classifier, run.log_dir)
        record_metrics(run, record, levels, weights)
        grid = os.path.join(run.log_dir, f"eval_samples_{step}.png")  # what was scored, to look at
        atomic_save_image(to_image(samples[:EVAL_GRID]).clamp(0, 1), grid, "free space there", nrow=10, padding=2)
        log.info("wrote %s (the first %d samples)", grid, min(EVAL_GRID, n))
    sittings.remove()
    return 0


def score_line(result, timing=""):
    """The scores of `result` (a record, or metrics.sample_metrics's dict) in one line that names the count they
    were measured at: '100 samples: FID 41.50, KID 0.0123 +- 0.0021, ...'."""
    n = result.get("n_samples", result.get("n_images"))
    kid = metrics.kid_text(result["kid"], result.get("kid_se"))
    return (f"{n} samples{timing}: FID {result['fid']:.2f}, KID {kid}, Inception-style score "
            f"{result['inception_score']:.2f}, confidence {result['mean_confidence']:.3f}, white "
            f"{100 * result['white_share']:.0f}%")


def nearest_check(data_root, images, test_u8, classifier, log_dir):
    """--eval's copy check: the distance of each sample (images (N, 1, 28, 28) in [0, 1]) and of the first
    NEAREST_TEST_IMAGES test images to their nearest training image (metrics.nearest_training_images: pixels and
    classifier features; a sample nearer than every test image is flagged), logged; writes nearest.png into
    `log_dir`: the NEAREST_GRID samples nearest to the training set, closest first, each beside its nearest
    training image. Returns the summary for metrics.json."""
    train = metrics.to_unit(load_mnist(data_root, train=True))  # (M, 1, 28, 28)
    test = metrics.to_unit(test_u8[:NEAREST_TEST_IMAGES].cpu())  # (T, 1, 28, 28)
    summary, nearest, distance = metrics.nearest_training_images(images, train, test, classifier)
    log.info("nearest training image (L2) of the samples: pixels median %.2f, min %.2f; features median %.2f, "
             "min %.2f. Of %d test images: pixels median %.2f, min %.2f; features median %.2f, min %.2f. "
             "%d samples nearer than every test image (copies?): %s", summary["pixel_samples"]["median"],
             summary["pixel_samples"]["min"], summary["feature_samples"]["median"], summary["feature_samples"]["min"],
             summary["n_test"], summary["pixel_test"]["median"], summary["pixel_test"]["min"],
             summary["feature_test"]["median"], summary["feature_test"]["min"], summary["n_copies"],
             summary["copy_indices"] or "none")
    order = distance.argsort()[:NEAREST_GRID]  # (k,) closest first
    pairs = torch.stack([images[order].float().clamp(0, 1), train[nearest[order]]], 1).flatten(0, 1)  # (2k, 1, 28, 28)
    path = os.path.join(log_dir, "nearest.png")
    atomic_save_image(pairs, path, "free space there", nrow=2 * NEAREST_PAIRS_A_ROW, padding=2)
    log.info("wrote %s (the %d samples nearest to a training image, each beside it)", path, len(order))
    return summary


class TrainingMetrics:
    """The training loop's on_snapshot hook for eval.every_snapshots = k: every k-th snapshot, FID and friends of
    eval.n_training samples of the sampling weights, with a generator of their own (the training stream is
    untouched). Holds the classifier and the test set's feature statistics, made at the first call.

    Under torchrun every rank takes part, so that none waits at a collective while another computes: rank 0
    gets the classifier (training and caching it the first time) while the others wait at a barrier (within
    main.COLLECTIVE_TIMEOUT_MIN), then they read its cache; each rank draws its share of the samples, rank 0
    scores them and writes metrics.json."""

    def __init__(self, config):
        self.config = config
        self.classifier, self.reference = None, None

    def __call__(self, state, test_u8):
        cfg, k, run = self.config, self.config.eval.every_snapshots, state.run
        if not k or (state.step // cfg.training.snapshot_freq) % k != 0:
            return
        if self.classifier is None:
            self.classifier = metrics.classifier_on_every_rank(cfg.data.root, state.device, run)
            if run.rank == 0:
                self.reference = metrics.reference_stats(self.classifier, metrics.to_unit(test_u8))
        t0 = time.time()
        generator = sampling_generator(run, state.device, derive_seed(state.seed, "training_metrics", state.step))
        lo, hi = run.shard(cfg.eval.n_training)
        samples = run.gather(draw_samples(state.sampling_score_fn(), state.sigmas, cfg, hi - lo, generator,
                                          state.device))
        if run.rank != 0:
            return
        result = metrics.sample_metrics(data_space(cfg)[1](samples), self.classifier, self.reference)
        log.info("step %d, %s", state.step, score_line(result, f" ({time.time() - t0:.0f} s)"))
        record_metrics(state.run, {"step": state.step, "n_samples": len(samples), "weights": sampling_weights(cfg),
                                   **result})  # all ranks' samples
