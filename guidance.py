"""Class-conditional sampling by guidance: a noise-conditional digit classifier p(y | x~, sigma_i) and the guided
score that asks a trained NCSN for one digit without retraining it.

Bayes' rule on the noised data at each level (Song et al., 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations", section 5, controllable generation, eq. 14):

    grad_x log p_i(x | y) = grad_x log p_i(x) + grad_x log p_i(y | x)

so the score of the digit y is the model's score s(x, sigma_i) plus the gradient of a classifier trained on
images noised at sigma_i. With a guidance scale w (Dhariwal & Nichol, 2021, "Diffusion Models Beat GANs on
Image Synthesis", section 4; w = 1 is Bayes' rule, w > 1 samples p_i(x) p_i(y | x)^w / Z, sharper digits at
less variety):

    s_w(x, i) = s(x, sigma_i) + w grad_x log p(y | x, sigma_i)

`guided_score_fn` builds s_w around any score function, and the unchanged sampler
(runner.anneal_langevin_dynamics) runs it. `get_guidance_classifier` trains the classifier once for a run's
noise levels (with a progress bar; about 6 minutes on one core) and caches it next to the data, beside
metrics.py's classifier; `python bench/guidance.py --doc NAME --classifier_only` makes it ahead of time and prints
its accuracy per level.

Its own module, apart from metrics.py: metrics.py's classifier is the independent judge of samples, trained
on clean digits and knowing nothing of the model, and must stay so, or guided samples would be scored by the
network that steered them. This classifier belongs to one set of noise levels (a run's) and is used only by
--sample --digit and bench/guidance.py. It imports nothing of runner.py, and runner.py nothing of it:
runner.sample takes the `guide` that main.py makes here (digit_guide).
"""
import hashlib
import json
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import NCSNError
from data import MNIST_FILES, data_space, dequantize, load_mnist, load_mnist_labels
from metrics import (FALLBACK_CACHE, cache_places, code_fingerprint, fit_classifier, random_shift, read_cache,
                     write_cache)

log = logging.getLogger("ncsn")

N_DIGITS = 10
CACHE_FORMAT = 1
CACHE_PREFIX = "ncsn_guidance_"  # <data.root>/MNIST/ncsn_guidance_<key of the noise levels>.pth
# The settings the guidance classifier trains with; part of the cache's fingerprint.
TRAIN_SETTINGS = {"epochs": 3, "batch_size": 128, "lr": 2e-3, "max_shift": 2, "seed": 0, "width": 32}
STATS_IMAGES = 10_000  # training images whose mean and spread (in the model's space) scale the input
ACCURACY_BATCH = 1000  # test images per forward pass of the per-level accuracy


# ----------------------------------------------------------------------------------------------------------
# The classifier

class NoisyDigitClassifier(nn.Module):
    """p(y | x~, sigma_i) for digits noised at level i: a small CNN conditioned on the level twice.

    The input is standardised with the level's own spread, (x~ - mean) / sqrt(std^2 + sigma_i^2), and every
    convolution's output is scaled and shifted per channel by a learned embedding of i (FiLM). SiLU and
    average pooling keep grad_x log p smooth and dense, which the guided score needs (a max pool or ReLU
    passes gradient to few pixels); no batch norm, so each sample's output is its own. forward(x, levels)
    takes x (B, 1, 28, 28) in the model's space and the level indices (B,) as the score network does, and
    returns logits (B, 10).
    """

    def __init__(self, sigmas, data_mean, data_std, width=32, n_hidden=128):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32).clone())  # (L,)
        self.register_buffer("data_stats", torch.tensor([float(data_mean), float(data_std)]))  # (2,)
        c = width
        self.convs = nn.ModuleList([nn.Conv2d(1, c, 3, padding=1),  # (B, c, 28, 28), pooled to 14
                                    nn.Conv2d(c, 2 * c, 3, padding=1),  # (B, 2c, 14, 14), pooled to 7
                                    nn.Conv2d(2 * c, 2 * c, 3, padding=1)])  # (B, 2c, 7, 7)
        self.film = nn.Embedding(len(self.sigmas), 2 * sum(conv.out_channels for conv in self.convs))
        nn.init.zeros_(self.film.weight)  # starts as the identity map at every level
        self.hidden = nn.Linear(2 * c * 7 * 7, n_hidden)
        self.head = nn.Linear(n_hidden, N_DIGITS)
        self.to(memory_format=torch.channels_last)  # oneDNN's CPU convolutions: 1.4x faster for training here

    def forward(self, x, levels):  # x (B, 1, 28, 28), levels (B,)
        mean, std = self.data_stats
        sigma = self.sigmas[levels].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        h = (x - mean) / torch.sqrt(std ** 2 + sigma ** 2)
        film = self.film(levels)  # (B, 2 * sum of the channels)
        start = 0
        for k, conv in enumerate(self.convs):
            n = conv.out_channels
            scale = film[:, start:start + n, None, None]  # (B, n, 1, 1)
            shift = film[:, start + n:start + 2 * n, None, None]  # (B, n, 1, 1)
            start += 2 * n
            h = F.silu(conv(h) * (1 + scale) + shift)
            if k < len(self.convs) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(F.silu(self.hidden(h.flatten(1))))  # (B, 10)


def noisy_images(images_u8, sigmas, levels, to_model, generator, max_shift=0):
    """x~ = to_model(dequantize(x)) + sigma_i z, z ~ N(0, I): the images the score network is trained on at
    `levels` (B,), optionally shifted by up to `max_shift` pixels first. images_u8 (B, 28, 28) -> (B, 1, 28, 28)."""
    x = dequantize(images_u8, generator)  # (B, 1, 28, 28) in [0, 1]
    if max_shift > 0:
        x = random_shift(x, max_shift, generator)
    x = to_model(x)
    return x + sigmas[levels].view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator)


@torch.no_grad()
def accuracy_per_level(model, images_u8, labels, to_model, seed, batch_size=ACCURACY_BATCH):
    """The share of `images_u8` (N, 28, 28) that `model` labels correctly when noised at each of its levels:
    a list of L floats, the noise drawn from a generator seeded with `seed`."""
    was_training = model.training
    model.eval()
    sigmas = model.sigmas.cpu()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(len(sigmas)):
        correct = 0
        for b in range(0, len(images_u8), batch_size):
            chunk = images_u8[b:b + batch_size]
            levels = torch.full((len(chunk),), i, dtype=torch.long)  # (b,)
            logits = model(noisy_images(chunk, sigmas, levels, to_model, g), levels)  # (b, 10)
            correct += int((logits.argmax(1) == labels[b:b + batch_size]).sum())
        out.append(correct / max(1, len(images_u8)))
    model.train(was_training)
    return out


def train_guidance_classifier(train_u8, train_labels, test_u8, test_labels, sigmas, to_model, seed=0, epochs=3,
                              batch_size=128, lr=2e-3, max_shift=2, width=32, max_steps=None, progress=True):
    """Train a NoisyDigitClassifier by cross-entropy on training images noised at levels drawn uniformly
    from `sigmas` (L,), with Adam (cosine-decayed lr) and random shifts of up to `max_shift` pixels.

    Seeded and deterministic on the CPU (weights, batch order, levels, noise and shifts come from `seed`; the
    global RNG is left as it was); `max_steps` cuts training short (tests). Returns (model in eval mode, the
    test accuracy at each level: a list of L floats)."""
    if len(train_u8) != len(train_labels) or len(test_u8) != len(test_labels):
        raise NCSNError(f"images and labels differ in number: {len(train_u8)} / {len(train_labels)} (train), "
                        f"{len(test_u8)} / {len(test_labels)} (test)")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).cpu()  # (L,)
    g = torch.Generator().manual_seed(seed)
    stats = to_model(dequantize(train_u8[torch.randperm(len(train_u8), generator=g)[:STATS_IMAGES]], g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoisyDigitClassifier(sigmas, stats.mean(), stats.std(), width=width)
    labels = train_labels.long()

    def batch_loss(idx):  # idx (B,)
        levels = torch.randint(len(sigmas), (len(idx),), generator=g)  # (B,)
        x = noisy_images(train_u8[idx], sigmas, levels, to_model, g, max_shift)  # (B, 1, 28, 28)
        return F.cross_entropy(model(x, levels), labels[idx])

    t0 = time.time()
    steps = fit_classifier(model, len(train_u8), batch_loss, g, epochs, batch_size, lr, max_steps,
                           desc="guidance classifier" if progress else None)
    model.eval()
    accuracy = accuracy_per_level(model, test_u8, test_labels.long(), to_model, seed)
    log.info("guidance classifier trained in %.0f s (%d steps); test accuracy per level (sigma_1 first): %s",
             time.time() - t0, steps, format_accuracy(sigmas, accuracy))
    return model, accuracy


def format_accuracy(sigmas, accuracy):
    return ", ".join(f"{float(s):.3g}: {100 * a:.1f}%" for s, a in zip(sigmas, accuracy))


# ----------------------------------------------------------------------------------------------------------
# The cache

_MAKERS = (NoisyDigitClassifier, noisy_images, random_shift, dequantize, train_guidance_classifier, fit_classifier)


def _levels(sigmas, logit_transform):
    """The noise levels as the cache names them: rounded to 7 significant digits, and the data space."""
    return {"sigmas": [float(f"{float(s):.7g}") for s in sigmas], "logit_transform": bool(logit_transform)}


def guidance_fingerprint(sigmas, logit_transform):
    """The fingerprint (metrics.code_fingerprint) of the code and settings that make the classifier, and of the
    levels it is trained at."""
    return code_fingerprint(_MAKERS, {"format": CACHE_FORMAT, **TRAIN_SETTINGS, **_levels(sigmas, logit_transform)})


def cache_name(sigmas, logit_transform):
    """The cache's file name: one file per set of noise levels, so that runs with other levels keep theirs."""
    key = hashlib.sha256(json.dumps(_levels(sigmas, logit_transform), sort_keys=True).encode()).hexdigest()
    return f"{CACHE_PREFIX}{key[:12]}.pth"


def _load_cached(path, fingerprint, device):
    """The classifier in `path`, or None when another code, setting or set of levels made it (retrain)."""
    cache = read_cache(path, ("model", "fingerprint", "sigmas", "test_accuracy_per_level"), "guidance classifier",
                       CACHE_FORMAT)
    if cache["fingerprint"] != fingerprint:
        log.info("guidance classifier cache %s was made by other code, settings or noise levels: training it "
                 "again", path)
        return None
    state = cache["model"]
    model = NoisyDigitClassifier(cache["sigmas"], *state["data_stats"].tolist(), width=TRAIN_SETTINGS["width"])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise NCSNError(f"guidance classifier cache {path} does not fit NoisyDigitClassifier: "
                        f"{str(e).splitlines()[0]}") from e
    log.info("guidance classifier from %s; test accuracy per level: %s", path,
             format_accuracy(cache["sigmas"], cache["test_accuracy_per_level"]))
    return model.to(device).eval()


def get_guidance_classifier(config, sigmas, device, cache_dir=None):
    """A trained NoisyDigitClassifier for the noise levels `sigmas` (L,) and data space of `config`, in eval
    mode on `device`, with its parameters frozen.

    Cached as <data.root>/MNIST/ncsn_guidance_<key of the levels>.pth, beside metrics.py's classifier; only
    where that folder exists and is read-only is `cache_dir` (default run/classifier) used instead. A cache
    made by other code, settings or levels is retrained and replaced, never used; an unreadable one is an
    NCSNError. With no cache and no MNIST files to train on it is a one-line NCSNError, and nothing is written.
    Training runs on the CPU, so that every device of one machine makes the same classifier (another CPU may
    round differently).
    """
    logit = config.data.logit_transform
    name, fingerprint = cache_name(sigmas, logit), guidance_fingerprint(sigmas, logit)
    folder = os.path.join(config.data.root, "MNIST")
    reads, target = cache_places(config.data.root, name,
                                 os.path.join(cache_dir or os.path.dirname(FALLBACK_CACHE), name))
    for path in reads:
        model = _load_cached(path, fingerprint, device) if os.path.isfile(path) else None
        if model is not None:
            return model.requires_grad_(False)
    raw = os.path.join(folder, "raw")
    missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if missing:
        raise NCSNError(f"guidance needs a digit classifier for this run's noise levels: there is no {name} in "
                        f"{folder} and no MNIST in {raw} to train one (missing {', '.join(missing)})")
    s = TRAIN_SETTINGS
    train_u8, test_u8 = load_mnist(config.data.root, train=True), load_mnist(config.data.root, train=False)
    train_y, test_y = load_mnist_labels(config.data.root, True), load_mnist_labels(config.data.root, False)
    log.info("training the guidance classifier for %d noise levels (%d epochs on the CPU), to cache in %s",
             len(sigmas), s["epochs"], target)
    t0 = time.time()
    model, accuracy = train_guidance_classifier(train_u8, train_y, test_u8, test_y, torch.as_tensor(sigmas).cpu(),
                                                data_space(config)[0], seed=s["seed"], epochs=s["epochs"],
                                                batch_size=s["batch_size"], lr=s["lr"], max_shift=s["max_shift"],
                                                width=s["width"])
    cache = {"format": CACHE_FORMAT, "model": model.state_dict(), "fingerprint": fingerprint,
             "sigmas": model.sigmas.tolist(), "logit_transform": bool(logit),
             "test_accuracy_per_level": [float(a) for a in accuracy], "train_seconds": float(time.time() - t0),
             "settings": dict(s)}
    write_cache(cache, target, "guidance classifier")
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# The guided score

def log_prob_grad(classifier, x, levels, digits):
    """grad_x log p(y | x, sigma_i) of each sample for its asked digit: (B, 1, 28, 28) like x.

    Each sample's log-probability depends on its own x only, so the gradient of their sum is every sample's
    own gradient. Works inside the sampler's torch.inference_mode: the gradient is taken on copies of x and
    the labels made outside it (inference tensors cannot be saved for backward)."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)  # (B, 1, 28, 28)
        logp = F.log_softmax(classifier(xg, levels.clone()), dim=1)  # (B, 10)
        chosen = logp.gather(1, digits.clone().view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, xg)
    return grad


def guided_score_fn(score_fn, classifier, digit_labels, w):
    """The score of the asked digits, s_w(x, i) = s(x, sigma_i) + w grad_x log p(y | x, sigma_i) (module
    docstring: eq. 14 of Song et al., 2021, scaled as Dhariwal & Nichol, 2021), as a function (x, levels) ->
    score that runner.anneal_langevin_dynamics takes in place of `score_fn`.

    digit_labels: the asked digit of each sample of the batch (B,), or one digit for all; w >= 0 (0: the
    model's own score). classifier(x, levels) -> logits (B, 10), e.g. a NoisyDigitClassifier."""
    def guided(x, levels):  # x (B, 1, 28, 28), levels (B,)
        score = score_fn(x, levels)
        if w == 0:
            return score
        digits = torch.as_tensor(digit_labels, dtype=torch.long, device=x.device).expand(len(x))  # (B,)
        return score + w * log_prob_grad(classifier, x, levels, digits).to(score.dtype)
    return guided


def asked_digits(digit, n):
    """The digit asked of each of n samples: `digit` (0..9) for all, or for "all" one block of n / 10 samples
    per digit, 0 first (one grid row each; n must be a multiple of 10). (n,) int64."""
    if digit == "all":
        if n % N_DIGITS:
            raise NCSNError(f"--digit all draws one row per digit: sampling.n_samples must be a multiple of "
                            f"{N_DIGITS}, got {n}")
        return torch.arange(N_DIGITS).repeat_interleave(n // N_DIGITS)  # (n,)
    return torch.full((n,), int(digit), dtype=torch.long)  # (n,)


def guidance_scale(scale, digit, config):
    """w: `scale` (--guidance_scale) when given, else sampling.guidance_scale; asking for `digit` needs it above 0."""
    w = scale if scale is not None else config.sampling.guidance_scale
    if w <= 0:
        raise NCSNError(f"--digit {digit} needs a guidance scale above 0 (sampling.guidance_scale is "
                        f"{config.sampling.guidance_scale}): pass --guidance_scale W, e.g. 5 "
                        f"(docs/results.md#what-the-guidance-scale-w-buys)")
    return w


def digit_guide(digit, scale, device):
    """--sample --digit D|all: the `guide` that runner.sample calls with (run config, score function, sigmas)
    once the run is loaded, for `digit` ("0".."9" or "all") at the guidance scale `scale` (None: the config's).
    It returns score_for_batch(start, stop), the guided score of samples start..stop, and the grid's row length
    (n / 10 for "all", one row per digit; None: square)."""
    def guide(config, score_fn, sigmas):
        w = guidance_scale(scale, digit, config)
        n = config.sampling.n_samples
        digits = asked_digits(digit, n).to(device)  # (n,)
        classifier = get_guidance_classifier(config, sigmas, device)
        log.info("guidance: digit %s, scale w = %g", digit, w)
        return (lambda start, stop: guided_score_fn(score_fn, classifier, digits[start:stop], w),
                n // N_DIGITS if digit == "all" else None)
    return guide
