"""--inpaint: complete MNIST test digits with a region hidden (appendix B.3 of Song & Ermon, 2019), with the
same annealed Langevin dynamics as --sample; the known pixels condition every level."""
import logging
import time

import torch

from build import read_trained, trained_network
from common import NCSNError, derive_seed
from data import dequantize, load_mnist
from progress import Progress
from rundir import output_paths
from runner import anneal_langevin_dynamics, initial_samples

log = logging.getLogger("ncsn")
MASKS = ("bottom", "right", "square", "random")
RANDOM_HIDDEN = 0.75  # the share of pixels the `random` mask hides
N_DIGITS = 10  # at most this many test digits (one row of the figure)


def inpainting_mask(kind, shape, generator=None, device="cpu"):
    """Boolean mask (B, 1, H, W), True where a pixel is known. kind: bottom | right | square | random
    (hide the bottom half, the right half, a centred square of half the side, or each pixel with p = 0.75)."""
    B, C, H, W = shape
    known = torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "bottom":
        known[..., H // 2:, :] = False
    elif kind == "right":
        known[..., :, W // 2:] = False
    elif kind == "square":
        known[..., H // 4:H - H // 4, W // 4:W - W // 4] = False
    elif kind == "random":
        known = torch.rand(shape, generator=generator, device=device) >= RANDOM_HIDDEN
    else:
        raise NCSNError(f"unknown inpainting mask {kind!r}: {', '.join(MASKS)}")
    return known


def inpaint(config, device, kind, seed, ckpt_path, out_folder, overwrite=False):
    """Complete test digits with `kind` of region hidden, with the checkpoint file `ckpt_path` (`config`, or None
    for the checkpoint's, gives the sampling settings: build.read_trained); writes inpaint_<kind>.png into
    `out_folder` (replacing it only with `overwrite`) with three rows: the originals, what the sampler sees (hidden
    pixels grey), the completions. Every random choice (the digits, their dequantization, the mask, the noise)
    follows `seed`."""
    device = torch.device(device)
    run_cfg, ckpt = read_trained(ckpt_path, config)
    scfg = run_cfg.sampling
    if run_cfg.data.logit_transform:
        raise NCSNError("--inpaint works on runs in pixel space (data.logit_transform: false)")
    if scfg.sampler != "langevin":
        raise NCSNError("--inpaint runs annealed Langevin dynamics only: set sampling.sampler: langevin")
    n = min(scfg.n_samples, N_DIGITS)
    score_fn, sigmas = trained_network(run_cfg, ckpt, ckpt_path, device, seed, n)
    names = output_paths(out_folder, [f"inpaint_{kind}.png"], overwrite)
    cpu = torch.Generator().manual_seed(derive_seed(seed, "inpaint"))
    generator = torch.Generator(device).manual_seed(seed)
    test_u8 = load_mnist(run_cfg.data.root, train=False)
    idx = torch.randperm(len(test_u8), generator=cpu)[:n]
    known = dequantize(test_u8[idx], cpu).to(device)  # (n, 1, 28, 28)
    mask = inpainting_mask(kind, known.shape, generator, device)
    x0 = initial_samples(run_cfg, sigmas, n, generator, device)
    t0 = time.time()
    with Progress(len(sigmas) * scfg.n_steps_each, "inpaint", "steps", on=device) as progress:
        completed = anneal_langevin_dynamics(score_fn, x0, sigmas, scfg.n_steps_each, scfg.step_lr, generator,
                                             callback=lambda i, t, x: progress.update(1), denoise=scfg.denoise,
                                             known=known, mask=mask)
    log.info("inpainted %d digits (%s hidden) in %.1f s", n, kind, time.time() - t0)
    from torchvision.utils import save_image
    shown = torch.where(mask, known, torch.full_like(known, 0.5))
    save_image(torch.cat([known, shown, completed.clamp(0, 1)]).cpu(), names[f"inpaint_{kind}.png"], nrow=n,
               padding=2)
    log.info("wrote %s", names[f"inpaint_{kind}.png"])
    return 0
