"""The README's two pictures from a --sample folder: the grid as it is, the Langevin movie cut to fit a page.

    python main.py --doc quick --sample                       # samples.png and movie.gif into run/logs/quick/samples
    python bench/readme_images.py run/logs/quick/samples       # -> images/quick_samples.png, images/quick_movie.gif
    python bench/readme_images.py RUNS/logs/tenepochs/samples --out images/tenepochs --name ""
                                                               # -> images/tenepochs/samples.png and movie.gif

--sample lays its samples out as a grid of `nrow` columns with `PAD` pixels between cells (torchvision's
make_grid). The movie keeps the top-left K x K samples and every STRIDE-th frame plus the last, which holds
for two seconds, so the GIF stays small enough for a web page.
"""
import argparse
import os
import shutil
import sys

from PIL import Image, ImageSequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL = 28        # MNIST's side in pixels
PAD = 2          # make_grid's default padding, as --sample writes it
FRAME_MS = 60    # each kept frame of the chain
LAST_MS = 2000   # the final samples stay on screen


def cut_movie(src, dst, k, stride):
    """The top-left k x k cells of every stride-th frame of src (and its last frame) into dst."""
    side = k * (CELL + PAD) + PAD
    with Image.open(src) as im:
        if min(im.size) < side:
            raise SystemExit(f"error: {src} is {im.size[0]} x {im.size[1]} pixels, smaller than {k} x {k} samples; "
                             f"choose a smaller --k")
        frames = [f.convert("L").crop((0, 0, side, side)) for f in ImageSequence.Iterator(im)]
    keep = frames[::stride]
    if (len(frames) - 1) % stride:
        keep.append(frames[-1])
    durations = [FRAME_MS] * (len(keep) - 1) + [LAST_MS]
    keep[0].save(dst, save_all=True, append_images=keep[1:], duration=durations, loop=0)
    return len(frames), len(keep)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="a --sample output folder holding samples.png and movie.gif")
    p.add_argument("--out", default=os.path.join(REPO, "images"), help="where the pictures go")
    p.add_argument("--name", default="quick",
                   help='the pictures are <name>_samples.png and <name>_movie.gif (--name "": without the prefix)')
    p.add_argument("--k", type=int, default=6, help="the movie shows k x k samples")
    p.add_argument("--stride", type=int, default=3, help="the movie keeps every stride-th frame")
    args = p.parse_args(argv)
    grid, movie = (os.path.join(args.samples, n) for n in ("samples.png", "movie.gif"))
    for path in (grid, movie):
        if not os.path.isfile(path):
            print(f"error: no {path}; run main.py --doc DOC --sample first (it writes samples.png and movie.gif)",
                  file=sys.stderr)
            return 1
    prefix = f"{args.name}_" if args.name else ""
    os.makedirs(args.out, exist_ok=True)
    shutil.copyfile(grid, os.path.join(args.out, f"{prefix}samples.png"))
    n, kept = cut_movie(movie, os.path.join(args.out, f"{prefix}movie.gif"), args.k, args.stride)
    print(f"{prefix}samples.png: the grid; {prefix}movie.gif: {args.k} x {args.k} samples, {kept} of {n} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
