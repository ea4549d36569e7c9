"""Sample-quality metrics for NCSN on MNIST: FID and an Inception-style score on a small digit classifier.

The Inception network of the usual FID and Inception Score (Heusel et al., 2017; Salimans et al., 2016)
knows nothing of MNIST, so both are computed here with `DigitClassifier`, a small CNN trained on MNIST:

    FID = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^(1/2))     on its penultimate features (B, D)
    KID = MMD^2_u with k(a, b) = (a.b / D + 1)^3                     on the same features (Binkowski et al., 2018)
    IS  = exp(E_x KL(p(y|x) || p(y))),  p(y) = E_x p(y|x)           on its softmax; 1 <= IS <= 10

FID is biased upwards at small sample counts (real digits score 41.5 at 100 samples and 1.74 at 10,000), so two
FIDs compare only at one count. KID is an unbiased estimate at any count, and comes with its standard error.

`get_classifier` trains it once (about a minute on two CPU cores) and caches it next to the data;
`sample_metrics` gives all numbers for a batch of images in one plain dict, so the notebook, the tests and
bench/quality.py call the same code. Values depend on this classifier, so they compare runs of this
project with each other, not with FIDs published on Inception features.
"""
import hashlib
import inspect
import json
import logging
import os
import stat
import time
import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import damage
from common import NCSNError, atomic_torch_save
from progress import Progress
from data import load_mnist, load_mnist_labels

logger = logging.getLogger("ncsn")

CACHE_FORMAT = 1
CACHE_NAME = "ncsn_classifier.pth"
FALLBACK_CACHE = os.path.join("run", "classifier", CACHE_NAME)
# The settings get_classifier trains with; part of the cache's fingerprint.
# A sample whose mean pixel exceeds this is a white image, not a digit (MNIST's mean pixel is 0.13; the
# brightest of the 60,000 training digits averages 0.40).
WHITE_MEAN = 0.5
TRAIN_SETTINGS = {"epochs": 2, "batch_size": 128, "lr": 2e-3, "max_shift": 2, "seed": 0}


# ----------------------------------------------------------------------------------------------------------
# The classifier

class DigitClassifier(nn.Module):
    """A small CNN for 28x28 digits in [0, 1]: three conv blocks, a 128-wide hidden layer, 10 logits.

    features(x) is the 128-dim hidden layer after its ReLU (the FID features); forward(x) the logits.
    The weights are kept channels_last: oneDNN's CPU convolutions run about ten times faster that way.
    """

    def __init__(self, width=32, n_features=128):
        super().__init__()
        c = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),  # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2c, 7, 7)
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),  # (B, 2c, 7, 7)
        )
        self.hidden = nn.Linear(2 * c * 7 * 7, n_features)
        self.head = nn.Linear(n_features, 10)
        self.to(memory_format=torch.channels_last)

    def features(self, x):  # x (B, 1, 28, 28) in [0, 1]
        return F.relu(self.hidden(self.conv(x - 0.5).flatten(1)))  # (B, D)

    def forward(self, x):
        return self.head(self.features(x))  # (B, 10) logits


def random_shift(x, max_shift, generator):
    """Translate each image by its own integer offset in [-max_shift, max_shift]^2, filling with 0."""
    b, _, h, w = x.shape
    m = max_shift
    padded = F.pad(x, (m, m, m, m))  # (B, 1, H + 2m, W + 2m)
    dy, dx = torch.randint(0, 2 * m + 1, (2, b, 1, 1), generator=generator)  # (B, 1, 1) each
    rows = (dy + torch.arange(h).view(1, h, 1)).expand(b, h, w)  # (B, H, W)
    cols = (dx + torch.arange(w).view(1, 1, w)).expand(b, h, w)  # (B, H, W)
    flat = rows * (w + 2 * m) + cols  # (B, H, W) indices into the padded image
    return padded.flatten(1).gather(1, flat.flatten(1)).view(b, 1, h, w)  # (B, 1, H, W)


def to_unit(images_u8):
    """uint8 digits (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1] (k / 255)."""
    return images_u8.unsqueeze(1).float() / 255.0


@torch.no_grad()
def classifier_accuracy(model, images_u8, labels, batch_size=1000):
    """Share of `images_u8` (N, 28, 28) that `model` labels correctly."""
    was_training = model.training
    model.eval()
    correct = 0
    for b in range(0, len(images_u8), batch_size):
        logits = model(to_unit(images_u8[b:b + batch_size]))  # (b, 10)
        correct += int((logits.argmax(1) == labels[b:b + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(images_u8))


def train_classifier(train_u8, train_labels, test_u8, test_labels, seed=0, log=None, epochs=2, batch_size=128,
                     lr=2e-3, max_shift=2, max_steps=None):
    """Train a DigitClassifier with Adam (cosine-decayed lr) and random shifts of up to `max_shift` pixels.

    Seeded and deterministic on the CPU: the initial weights, the batch order and the shifts come from `seed`
    only, in this process, and the global RNG is left as it was. `max_steps` cuts training short (tests).
    log(message) reports progress (default: the "ncsn" logger). Returns (model in eval mode, test accuracy).
    """
    say = log or logger.info
    if len(train_u8) != len(train_labels) or len(test_u8) != len(test_labels):
        raise NCSNError(f"images and labels differ in number: {len(train_u8)} / {len(train_labels)} (train), "
                        f"{len(test_u8)} / {len(test_labels)} (test)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    g = torch.Generator().manual_seed(seed)
    labels = train_labels.long()

    def batch_loss(idx):  # idx (B,)
        x = to_unit(train_u8[idx])  # (B, 1, 28, 28)
        if max_shift > 0:
            x = random_shift(x, max_shift, g)
        return F.cross_entropy(model(x), labels[idx])

    def on_epoch(epoch, loss):
        say(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, {time.time() - t0:.0f} s")

    t0 = time.time()
    fit_classifier(model, len(train_u8), batch_loss, g, epochs, batch_size, lr, max_steps, on_epoch=on_epoch,
                   desc="digit classifier")
    model.eval()
    accuracy = classifier_accuracy(model, test_u8, test_labels.long())
    say(f"classifier trained in {time.time() - t0:.1f} s on {len(train_u8)} images: test accuracy "
        f"{100 * accuracy:.2f}%")
    return model, accuracy


def fit_classifier(model, n, batch_loss, generator, epochs, batch_size, lr, max_steps=None, on_epoch=None,
                   desc=None):
    """Minimise batch_loss(indices (B,)) -> loss over `epochs` passes through n examples in random batches of
    `batch_size` (their order from `generator`), with Adam and the lr decayed to 0 on a cosine. `max_steps`
    cuts training short (tests), on_epoch(epoch, last loss) is called after each pass, and `desc` names its
    progress (progress.Progress; None: none). Returns the number of steps; the model is left in training mode."""
    steps_per_epoch = -(-n // batch_size)
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / total)))
    bar = Progress(total, desc or "", "steps", enabled=desc is not None)
    step = 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(steps_per_epoch):
            if step == total:
                break
            loss = batch_loss(perm[i * batch_size:(i + 1) * batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
        if on_epoch is not None:
            on_epoch(epoch, loss)
    bar.close()
    return step


# ----------------------------------------------------------------------------------------------------------
# Data and the on-disk cache

_MAKERS = (DigitClassifier, random_shift, to_unit, train_classifier, fit_classifier)  # the code that makes it


def code_fingerprint(makers, settings):
    """sha256 of the source of `makers` (the functions and classes that make a cached classifier) and of the dict
    `settings` (as sorted JSON): a cache whose fingerprint differs was made otherwise and is trained again. This
    module's classifier and guidance.py's both fingerprint their caches here."""
    parts = [inspect.getsource(f) for f in makers]
    parts.append(json.dumps(settings, sort_keys=True))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def classifier_fingerprint():
    """The fingerprint of the code and settings that make the cached DigitClassifier."""
    return code_fingerprint(_MAKERS, {"format": CACHE_FORMAT, **TRAIN_SETTINGS})


def _writable(folder):
    """True if `folder` exists and may be written. Its permission bits count even for root (which
    os.access lets write anywhere), so a dr-xr-xr-x shared data folder is left alone."""
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & 0o222) and os.access(folder, os.W_OK | os.X_OK)


def cache_places(data_root, name, fallback):
    """Where a classifier cache called `name` is read (in this order) and written: <data_root>/MNIST/<name>,
    beside the data; and the file `fallback` instead where that folder exists and is read-only (a shared data
    folder). Returns (paths to read, path to write)."""
    folder = os.path.join(data_root, "MNIST")
    primary = os.path.join(folder, name)
    if os.path.isdir(folder) and not _writable(folder):
        return [primary, fallback], fallback
    return [primary], primary


def read_cache(path, keys=("model", "fingerprint", "test_accuracy"), what="classifier", fmt=CACHE_FORMAT):
    """The classifier cache dict at `path` (torch.load with weights_only=True, onto the CPU), checked to be of
    format `fmt` and to hold `keys`; a one-line NCSNError naming `what` if it is unreadable, damaged (a member
    whose bytes do not match their CRC-32, which torch.load does not check: checkpoint.damage) or not such a
    cache. Both caches are read here: this module's (the defaults) and guidance.py's."""
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises one of several types
        first = str(e).splitlines()[0] if str(e) else ""
        raise NCSNError(f"{what} cache {path} is truncated or not a cache of this code ({type(e).__name__}: "
                        f"{first}); delete it to train the classifier again") from e
    problem = damage(path)  # what torch.load read without a word: a flipped bit in the weights
    if problem is not None:
        raise NCSNError(f"{what} cache {path} is {problem}; delete it to train the classifier again")
    if not isinstance(cache, dict) or cache.get("format") != fmt or not set(keys) <= set(cache):
        raise NCSNError(f"{what} cache {path} is not a cache of this code (format {fmt}); "
                        f"delete it to train the classifier again")
    return cache


def _load_cached(path, device):
    """The classifier held in `path`, or None if it was made by other code (a different fingerprint)."""
    cache = read_cache(path)
    if cache["fingerprint"] != classifier_fingerprint():
        logger.info("classifier cache %s was made by different code or settings: training it again", path)
        return None
    model = DigitClassifier()
    try:
        model.load_state_dict(cache["model"])
    except RuntimeError as e:
        raise NCSNError(f"classifier cache {path} does not fit DigitClassifier: {str(e).splitlines()[0]}") from e
    logger.info("classifier from %s (test accuracy %.2f%%)", path, 100 * cache["test_accuracy"])
    return model.to(device).eval()


def get_classifier(data_root, device, cache_path=None):
    """A trained DigitClassifier in eval mode on `device`, cached on disk next to the data.

    The cache is <data_root>/MNIST/ncsn_classifier.pth; only where that folder exists and is read-only (a
    shared data folder) is `cache_path` (default run/classifier/ncsn_classifier.pth) read and written instead.
    A cache made by other code (fingerprint) is retrained and overwritten; an unreadable one raises NCSNError.
    Training runs on the CPU, seeded, so that it repeats on one machine (another CPU's kernels round
    differently: docs/results.md#reference-rows); compare scores made with one cache.
    """
    reads, target = cache_places(data_root, CACHE_NAME, cache_path or FALLBACK_CACHE)
    for path in reads:
        model = _load_cached(path, device) if os.path.isfile(path) else None
        if model is not None:
            return model

    s = TRAIN_SETTINGS
    train_u8 = load_mnist(data_root, train=True)  # (N, 28, 28) uint8; downloads into <root>/MNIST
    test_u8 = load_mnist(data_root, train=False)  # (N_test, 28, 28) uint8
    train_y, test_y = load_mnist_labels(data_root, True), load_mnist_labels(data_root, False)
    if target != reads[0]:
        logger.info("%s is not writable: caching the classifier in %s", os.path.dirname(reads[0]), target)
    logger.info("training the digit classifier for FID, KID and IS (%d epochs on the CPU)", s["epochs"])
    t0 = time.time()
    model, accuracy = train_classifier(train_u8, train_y, test_u8, test_y, seed=s["seed"], epochs=s["epochs"],
                                       batch_size=s["batch_size"], lr=s["lr"], max_shift=s["max_shift"])
    cache = {"format": CACHE_FORMAT, "model": model.state_dict(), "test_accuracy": float(accuracy),
             "fingerprint": classifier_fingerprint(), "train_seconds": float(time.time() - t0),
             "settings": dict(s)}
    write_cache(cache, target, "classifier")
    return model.to(device).eval()


def classifier_on_every_rank(data_root, device, run):
    """get_classifier on each rank of `run` (rundir.Run) with one training at most: rank 0 gets it first (training and
    caching it where there is no cache) while the others wait at a barrier (within main.COLLECTIVE_TIMEOUT_MIN),
    then they read the cache."""
    classifier = get_classifier(data_root, device) if run.rank == 0 else None
    run.barrier()  # the cache exists now
    return classifier if classifier is not None else get_classifier(data_root, device)


def write_cache(cache, target, what):
    """Save a classifier cache dict atomically at `target` (making its folder); a one-line NCSNError if not
    possible. `what` names the classifier in the messages."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        atomic_torch_save(cache, target)
    except OSError as e:
        raise NCSNError(f"cannot write the {what} cache {target}: {e.strerror}") from e
    logger.info("%s cached in %s", what, target)


# ----------------------------------------------------------------------------------------------------------
# FID and IS

def feature_stats(features):
    """Mean (D,) and covariance (D, D), float64, of features (N, D), N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise NCSNError(f"feature statistics need an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _trace_sqrt_product(cov1, cov2):
    """Tr((cov1 cov2)^(1/2)) as Tr((R cov2 R)^(1/2)), R = cov1^(1/2): a symmetric PSD matrix whose root is
    real, so this stays exact where sqrtm of the (non-symmetric, singular) product is swamped by rounding."""
    w, v = np.linalg.eigh(cov1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D) = cov1^(1/2)
    m = r @ cov2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, cov1, mu2, cov2):
    """Frechet distance of N(mu1, cov1) and N(mu2, cov2) (Dowson & Landau, 1982; the FID of Heusel et al., 2017):

        d^2 = ||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))

    in float64, the root by scipy.linalg.sqrtm with rounding-level imaginary parts dropped. When the root is
    not finite or has a larger imaginary part (covariances of fewer samples than features, dead ReLU units),
    its trace is taken from the equal symmetric form Tr((cov1^(1/2) cov2 cov1^(1/2))^(1/2)) instead.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise NCSNError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                        f"cov {cov1.shape} / {cov2.shape}")
    with warnings.catch_warnings():  # "Matrix is singular": expected for dead ReLU units, checked below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov1 @ cov2)
    scale = max(1.0, float(np.trace(cov1) + np.trace(cov2)))
    if np.isfinite(root).all() and np.abs(np.imag(root)).max(initial=0.0) <= 1e-6 * scale:
        trace_root = float(np.trace(root).real)
    else:
        logger.debug("frechet_distance: sqrtm inaccurate (singular covariances); using the symmetric form")
        trace_root = _trace_sqrt_product(cov1, cov2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """Features (N, D) and class probabilities (N, 10), float64 numpy, of images (N, 1, 28, 28)."""
    was_training = classifier.training
    classifier.eval()
    params = list(classifier.parameters())
    device = params[0].device if params else torch.device("cpu")
    feats, probs = [], []
    for b in range(0, len(images), batch_size):
        x = images[b:b + batch_size].to(device=device, dtype=torch.float32)  # (b, 1, 28, 28)
        # float64 on the CPU only: MPS has none ("Cannot convert a MPS Tensor to float64 dtype")
        feats.append(classifier.features(x).cpu().double())  # (b, D)
        probs.append(torch.softmax(classifier(x).cpu().double(), dim=1))  # (b, 10)
    classifier.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _as_images(images, what):
    """Float images (N, 1, 28, 28) clamped to [0, 1]; non-finite pixels become 0 (NaN, -inf) or 1 (+inf).
    Returns the images and how many had a non-finite pixel."""
    if not torch.is_tensor(images):
        images = torch.as_tensor(images)
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28) or len(images) < 2:
        raise NCSNError(f"{what}: expected at least two images of shape (N, 1, 28, 28), got {tuple(images.shape)}")
    images = images.float()
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    return torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1), bad


def reference_stats(classifier, reference_images, batch_size=500):
    """Feature mean and covariance (FID) and the features themselves (KID) of the reference set (e.g. the MNIST test
    set as float / 255), to pass to sample_metrics in place of the images when evaluating many sample sets against
    one reference."""
    images, _ = _as_images(reference_images, "reference images")
    features = classify(classifier, images, batch_size)[0]  # (N_ref, D)
    mu, cov = feature_stats(features)
    return {"mu": mu, "cov": cov, "n": len(images), "features": features}


KID_SUBSETS = 10  # KID is the mean of its estimate on this many disjoint subsets of the samples (fewer where there
#                   are under 2 samples a subset); their spread gives its standard error
KID_REFERENCE_SUBSET = 1000  # reference features paired with each subset (disjoint too): 10 x 1,000 of the test set
KID_SEED = 0  # the split into subsets: fixed, so that the same samples always score the same


def polynomial_kernel(a, b):
    """k(a, b) = (a.b / D + 1)^3 for features a (N, D) and b (M, D): (N, M), the kernel of KID."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y):
    """The unbiased estimate of the squared MMD between the distributions of features x (m, D) and y (n, D),
    m, n >= 2, under polynomial_kernel (Gretton et al., 2012, eq. 3):
        1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i, y_j) - 2/(mn) sum_{i,j} k(x_i, y_j)"""
    m, n = len(x), len(y)
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * polynomial_kernel(x, y).mean())


def kernel_inception_distance(features, reference_features, subsets=KID_SUBSETS):
    """KID of features (N, D) against reference features (M, D) (Binkowski et al., 2018, "Demystifying MMD
    GANs"): the samples and the reference are each split at random (KID_SEED) into k = min(subsets, N // 2,
    M // 2) disjoint subsets, subset j of the samples is scored against subset j of the reference (at most
    KID_REFERENCE_SUBSET features) by mmd2_unbiased, and KID is the mean of the k estimates, an unbiased estimate
    of MMD^2 at any N. Returns (KID, its standard error std / sqrt(k) over the independent subsets; None for k = 1).
    KID can be slightly negative for samples distributed as the reference."""
    x, y = np.asarray(features, np.float64), np.asarray(reference_features, np.float64)
    k = min(subsets, len(x) // 2, len(y) // 2)
    if k < 1 or x.shape[1:] != y.shape[1:]:
        raise NCSNError(f"KID needs at least 2 samples and 2 reference features of one width, got {x.shape} and "
                        f"{y.shape}")
    rng = np.random.default_rng(KID_SEED)
    xs = np.array_split(x[rng.permutation(len(x))][:len(x) // k * k], k)  # k equal parts
    per = min(KID_REFERENCE_SUBSET, len(y) // k)
    ys = np.array_split(y[rng.permutation(len(y))][:per * k], k)
    estimates = np.array([mmd2_unbiased(a, b) for a, b in zip(xs, ys)])  # (k,)
    se = float(estimates.std(ddof=1) / np.sqrt(k)) if k > 1 else None
    return float(estimates.mean()), se


def kid_text(kid, kid_se, plus_minus="+-"):
    """KID as every score line writes it: '0.0123 +- 0.0021', without the error where there is none."""
    return f"{kid:.3g}" + (f" {plus_minus} {kid_se:.2g}" if kid_se is not None else "")


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities (N, K), p(y) their mean; between 1 and K."""
    p = np.asarray(probs, dtype=np.float64)  # (N, K)
    p_y = p.mean(axis=0, keepdims=True)  # (1, K)
    return float(np.exp(scipy.special.rel_entr(p, p_y).sum(axis=1).mean()))


def sample_metrics(images, classifier, reference_images, batch_size=500):
    """FID, Inception-style score and class statistics of images (N, 1, 28, 28) in [0, 1] (clamped).

    reference_images: the reference set as images (N_ref, 1, 28, 28) in [0, 1], or reference_stats(...).
    Returns a plain dict:
        fid               FID of the images' classifier features against the reference set
        kid, kid_se       KID of the same features (kernel_inception_distance) and its standard error (None for
                          fewer than 4 images)
        inception_score   exp(E_x KL(p(y|x) || p(y))), 1 (one class) to 10 (ten classes, each certain)
        class_shares      share of each predicted digit 0..9 (sums to 1)
        mean_confidence   mean top-class probability
        n_images          N
        nonfinite_images  images with a NaN or infinite pixel (mapped into [0, 1] before scoring)
        white_share       share of images with mean pixel > 0.5: MNIST digits average about 0.13, so these
                          are white backgrounds (a score that pushes the background up), not digits
    """
    x, bad = _as_images(images, "sample images")
    ref = reference_images if isinstance(reference_images, dict) else \
        reference_stats(classifier, reference_images, batch_size)
    feats, probs = classify(classifier, x, batch_size)
    mu, cov = feature_stats(feats)
    counts = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    kid, kid_se = kernel_inception_distance(feats, ref["features"])
    return {
        "fid": frechet_distance(mu, cov, ref["mu"], ref["cov"]),
        "kid": kid,
        "kid_se": kid_se,
        "inception_score": inception_score(probs),
        "class_shares": (counts / counts.sum()).tolist(),
        "mean_confidence": float(probs.max(axis=1).mean()),
        "n_images": len(x),
        "nonfinite_images": bad,
        "white_share": float((x.flatten(1).mean(1) > WHITE_MEAN).float().mean()),
    }


# ----------------------------------------------------------------------------------------------------------
# Nearest training images: is a sample a copy?

NEAREST_CHUNK = 256  # query rows per block of the distance matrix (256 x 60,000 in float64: 123 MB)
COPY_RULE = ("pixel distance to the nearest training image below the smallest such distance of any of the "
             "held-out test images")


def nearest_neighbours(queries, references, chunk=NEAREST_CHUNK):
    """The nearest row of `references` (M, ...) to each row of `queries` (N, ...) in Euclidean distance, by
    exhaustive search: (distances (N,) float64, indices (N,) int64).

    Blocks of `chunk` queries against all references with torch.cdist in float64 (the first index wins a tie);
    the returned distance is recomputed directly as ||q - r||, so it does not carry the rounding of the
    matrix-product form cdist uses for long rows. On the CPU, wherever the inputs are (MPS has no float64)."""
    q = queries.flatten(1).cpu().double()  # (N, D)
    r = references.flatten(1).cpu().double()  # (M, D)
    if q.shape[1] != r.shape[1] or len(r) == 0:
        raise NCSNError(f"nearest_neighbours: queries {tuple(q.shape)} and references {tuple(r.shape)} do not fit")
    indices = []
    for b in range(0, len(q), chunk):
        indices.append(torch.cdist(q[b:b + chunk], r).argmin(1))  # (c,) from the (c, M) distances
    idx = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)  # (N,)
    return (q - r[idx]).norm(dim=1), idx


def _spread(d):
    d = np.asarray(d, dtype=np.float64)
    return {"min": float(d.min()), "median": float(np.median(d)), "mean": float(d.mean()), "max": float(d.max())}


def nearest_training_images(samples, train_images, test_images, classifier, batch_size=500):
    """How close samples come to the training set, against how close held-out test images come.

    samples (N, 1, 28, 28), train_images (M, 1, 28, 28) and test_images (T, 1, 28, 28), all in [0, 1]. For
    each sample and each test image: the L2 distance to its nearest training image over the 784 pixels and
    over the classifier's 128 features (nearest_neighbours, exact). The test images say how near a new digit
    of the same distribution comes to the training set; a sample is flagged as a copy by COPY_RULE, i.e. when
    it is nearer (in pixels) than every test image is.

    Returns (summary, nearest, distances): the dict for metrics.json (min, median, mean, max of each of the
    four sets of distances, the threshold, n_copies and copy_indices), the index of each sample's nearest
    training image in pixels (N,) and that pixel distance (N,)."""
    x, _ = _as_images(samples, "sample images")
    train, _ = _as_images(train_images, "training images")
    test, _ = _as_images(test_images, "test images")
    pixel_d, nearest = nearest_neighbours(x, train)  # (N,), (N,)
    test_pixel_d, _ = nearest_neighbours(test, train)  # (T,)
    feats = [torch.from_numpy(classify(classifier, images, batch_size)[0]) for images in (x, train, test)]
    feature_d, _ = nearest_neighbours(feats[0], feats[1])  # (N,)
    test_feature_d, _ = nearest_neighbours(feats[2], feats[1])  # (T,)
    threshold = float(test_pixel_d.min())
    copies = torch.nonzero(pixel_d < threshold).flatten().tolist()
    summary = {"pixel_samples": _spread(pixel_d), "pixel_test": _spread(test_pixel_d),
               "feature_samples": _spread(feature_d), "feature_test": _spread(test_feature_d),
               "n_samples": len(x), "n_train": len(train), "n_test": len(test), "copy_rule": COPY_RULE,
               "copy_threshold": threshold, "n_copies": len(copies), "copy_indices": copies}
    return summary, nearest, pixel_d
