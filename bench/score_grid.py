"""Scores of the digits in a grid picture, as --sample and --eval write them (samples.png, eval_samples_<step>.png).

    python bench/score_grid.py images/tenepochs/samples.png --data_root ../shared/data
    python bench/score_grid.py images/quick_samples.png images/tenepochs/samples.png --data_root DATA

Each picture is cut back into its 28 x 28 cells (torchvision's make_grid layout: `PAD` black pixels around
every cell) and scored as `--eval` scores samples (ncsn.score: FID and KID on the repository's MNIST classifier
against the 10,000 test images, IS, confidence, digit shares, white share). A grid keeps each pixel rounded to a
step of 1/255, as MNIST itself is stored; `--eval` scores the samples before that rounding. Use it where the
grid is all that is left of a run, or to score a picture that another program made in the same layout. FID
compares only sets of the same size (KID at any size).
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import metrics  # noqa: E402
import ncsn  # noqa: E402
from common import NCSNError  # noqa: E402
from readme_images import CELL, PAD  # noqa: E402  (28-pixel cells, make_grid's 2-pixel gaps, as --sample writes)


def grid_shape(size, what):
    """(rows, columns) of a make_grid picture of `size` = (width, height) pixels, or NCSNError."""
    width, height = size
    if (width - PAD) % (CELL + PAD) or (height - PAD) % (CELL + PAD) or min(width, height) < CELL + 2 * PAD:
        raise NCSNError(f"{what} is {width} x {height} pixels, not a grid of {CELL} x {CELL} digits with {PAD}-pixel "
                        f"gaps; give a samples.png as --sample or --eval writes it")
    return (height - PAD) // (CELL + PAD), (width - PAD) // (CELL + PAD)


def read_grid(path, n=None):
    """The digits of a grid picture, row by row, as float images (N, 1, 28, 28) in [0, 1]; the first n if given."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8; make_grid repeats a grey digit in R, G and B
    rows, cols = grid_shape((pixels.shape[1], pixels.shape[0]), path)
    if not (pixels == pixels[..., :1]).all():
        raise NCSNError(f"{path} has colour; the grids of --sample and --eval are grey: give one of those")
    grey = torch.from_numpy(pixels[..., 0].copy())  # (H, W)
    step = CELL + PAD
    body = grey[PAD:, PAD:].view(rows, step, cols, step)  # each cell followed by its gap below and to its right
    if grey[:PAD].any() or grey[:, :PAD].any() or body[:, CELL:].any() or body[:, :, :, CELL:].any():
        raise NCSNError(f"{path} has light pixels between its {CELL} x {CELL} cells, so it is not a make_grid "
                        f"picture with {PAD}-pixel gaps; give a samples.png as --sample or --eval writes it")
    cells = body[:, :CELL, :, :CELL].permute(0, 2, 1, 3)  # (rows, cols, 28, 28)
    images = cells.reshape(rows * cols, 1, CELL, CELL).float() / 255  # (N, 1, 28, 28)
    if n is not None:
        if not 2 <= n <= len(images):
            raise NCSNError(f"--n {n}: {path} holds {len(images)} digits; give 2 to {len(images)}")
        images = images[:n]
    return images


def score_row(name, scores):
    shares = scores["class_shares"]
    kid = "" if scores["kid"] is None else metrics.kid_text(scores["kid"], scores["kid_se"], "±")
    return (f"| {name} | {scores['n_images']} | {scores['fid']:.1f} | {kid} | {scores['inception_score']:.2f} | "
            f"{scores['mean_confidence']:.3f} | {100 * min(shares):.0f}%-{100 * max(shares):.0f}% | "
            f"{100 * scores['white_share']:.0f}% |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grids", nargs="+", help="grid pictures (PNG) as --sample or --eval writes them")
    p.add_argument("--data_root", default="run/datasets", help="MNIST in <data_root>/MNIST/raw")
    p.add_argument("--n", type=int, default=None, help="score the first n digits of each grid (default: all)")
    args = p.parse_args(argv)
    try:
        grids = [(path, read_grid(path, args.n)) for path in args.grids]  # every picture checked before scoring
        rows = [(path, ncsn.score(images, args.data_root, device="cpu")) for path, images in grids]
    except (NCSNError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("| grid | digits | FID | KID (± se) | IS | confidence | digit shares | white |")
    print("|---|---|---|---|---|---|---|---|")
    for path, scores in rows:
        print(score_row(path, scores))
    for path, scores in rows:
        print(f"{path}: digit shares 0-9 " + " ".join(f"{s:.2f}" for s in scores["class_shares"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
