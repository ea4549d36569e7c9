"""Factories that turn a config into the objects a command runs: the score network (in the configured memory
format, compiled or eager), its score function s(x, i) under the configured precision, and Adam; and the network
of a checkpoint with the config it samples under (`read_trained`, `trained_network`), which --sample, --eval,
--inpaint, --digit and the benchmarks share.

Its own module so that training, sampling, --import_authors, the benchmarks and the tests build these the same
way, and runner.py keeps the method. It imports nothing of runner.py: what runner.py knows of the network comes
from here.
"""
import dataclasses
import logging

import torch

import devices
import speedpath
from checkpoint import checkpoint_config, load_checkpoint, load_model_state
from common import NCSNError
from model import CondRefineNetDilated
from noise import check_sampler, config_sigmas

log = logging.getLogger("ncsn")


def make_model(config, device):
    """The score network of `config` (model.py's CondRefineNetDilated) on `device`, in fast.channels_last's layout."""
    model = CondRefineNetDilated(ngf=config.model.ngf, num_classes=config.model.num_classes,
                                 channels=config.data.channels, logit_transform=config.data.logit_transform,
                                 fast_kernels=config.fast.fast_kernels).to(device)
    return model.to(memory_format=memory_format(config))


# What compiling buys the quick recipe's network (ngf 8) on a 2-core CPU, from bench/quick_speed.py: CIN++ compiled
# against eager, channels_last both, 1.44x to 1.65x a training step and 1.04x to 1.21x a sampling evaluation on
# AVX-512 and AVX2 (docs/speed.md#the-eager-fallback).
COMPILE_GAIN = "a training step 1.4-1.7x as long, a sampling step up to 1.2x"


def compile_model(model, config, warm_up):
    """torch.compile the network in place when fast.compile is on (or only its CIN++ and ELU with fast.compile_norms):
    its parameters and state_dict keys stay the plain module's (so checkpoints and EMA see it as it is). Then
    warm_up(model) calls it as the command will (a training step's forward and backward, or a sampling evaluation),
    so that every kernel is built now, before the first real step. Where they cannot be built (no C++ compiler, a
    broken one, another inductor failure) the network runs eagerly, the same function, with one warning; nothing
    fails later. Logs the speed path with the layout, and returns it in words."""
    path = compile_or_fall_back(model, config, warm_up)
    log.info("speed path: %s, %s", path, "channels_last" if config.fast.channels_last else "NCHW")
    return path


def compile_or_fall_back(model, config, warm_up):
    """compile_model's work: the speed path in words."""
    switch = "fast.compile" if config.fast.compile else "fast.compile_norms" if config.fast.compile_norms else None
    if switch is None:
        return "eager"
    if config.fast.compile:
        model.compile(dynamic=False)  # a static graph per batch size: symbolic shapes compile far slower
    else:
        model.compile_norms(dynamic=False)
    try:
        warm_up(model)
    except Exception as e:
        if not compile_failure(e):
            raise
        model.eager()
        why = " ".join(str(e).split("\n")[0].split())[:160] or type(e).__name__
        log.warning("%s is on, but torch.compile cannot build its kernels here (%s): running eagerly, the same "
                    "function, slower (quick recipe: %s; docs/speed.md#the-eager-fallback); --set %s=false runs "
                    "eagerly without this warning", switch, why, COMPILE_GAIN, switch)
        return f"eager ({switch} could not build its kernels)"
    return "the whole network compiled (fast.compile)" if config.fast.compile else \
        "CIN++ and its ELU compiled (fast.compile_norms)"


def compile_failure(e):
    """Whether the exception `e` comes from building compiled kernels (dynamo, inductor, the C++ compiler), not from
    the network itself."""
    import subprocess
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError
    return isinstance(e, (TorchDynamoException, CppCompileError, subprocess.CalledProcessError))


def warm_up_training(config, device, batch):
    """The warm_up of compile_model for training: one forward and backward at the batch a step will use (zeros in,
    gradients cleared after); no random number is drawn, so the run is the same as without it."""
    def warm_up(model):
        make_score_fn(model, config, device, torch.ones(config.model.num_classes, device=device))(
            *zeros_batch(config, device, batch)).float().sum().backward()
        model.zero_grad(set_to_none=True)
    return warm_up


def warm_up_sampling(config, device, batch):
    """The warm_up of compile_model for sampling: one evaluation under inference_mode at the first batch's size."""
    def warm_up(model):
        with torch.inference_mode():
            make_score_fn(model, config, device, torch.ones(config.model.num_classes, device=device))(
                *zeros_batch(config, device, batch))
    return warm_up


def zeros_batch(config, device, batch):
    """(x, levels) of zeros for `batch` images of the config's data: (B, C, H, W) and (B,)."""
    shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
    return torch.zeros(shape, device=device), torch.zeros(batch, dtype=torch.long, device=device)


def memory_format(config):
    """The layout of the network's weights and inputs: channels_last with fast.channels_last, else NCHW."""
    return torch.channels_last if config.fast.channels_last else torch.contiguous_format


def autocast(config, device):
    """bf16 autocast for the network when fast.bf16 is on and the device has it (the weights stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=config.fast.bf16 and devices.bf16_autocast_ok(device))


def make_score_fn(model, config, device, sigmas):
    """s(x, i) as the sampler and the loss call it: the model under the configured precision, divided by
    sigma_i when model.scale_by_sigma is on."""
    def score_fn(x, labels):  # x (B, 1, 28, 28), labels (B,)
        with autocast(config, device):
            out = model(x.contiguous(memory_format=memory_format(config)), labels)
        return out / sigmas[labels].view(-1, 1, 1, 1) if config.model.scale_by_sigma else out
    return score_fn


def make_optimizer(config, model):
    """Adam over the model's parameters with the optim section's settings (fused where devices.use_fused_adam says)."""
    return torch.optim.Adam(model.parameters(), lr=config.optim.lr, betas=(config.optim.beta1, 0.999),
                            weight_decay=config.optim.weight_decay, amsgrad=config.optim.amsgrad,
                            fused=devices.use_fused_adam(config, next(model.parameters()).device))


# ----------------------------------------------------------------------------------------------------------
# The network of a checkpoint

def read_trained(ckpt_path, config):
    """(config, checkpoint dict on the CPU) of the checkpoint file ckpt_path (a run's checkpoint.pth or a numbered
    snapshot). The model and data settings are the checkpoint's; `sampling`, `eval`, `fast` and data.root come from
    `config` (the run's config.yml, or --config, with --set) when it is given. A sampler setting that cannot run
    is a one-line error here, before anything is built or written."""
    ckpt = load_checkpoint(ckpt_path, "cpu")  # the device gets only the weights it samples with
    run_cfg = checkpoint_config(ckpt, ckpt_path)
    if config is not None:
        run_cfg = dataclasses.replace(run_cfg, sampling=config.sampling, fast=config.fast, eval=config.eval,
                                      data=dataclasses.replace(run_cfg.data, root=config.data.root))
    check_sampler(run_cfg.sampling, config_sigmas(run_cfg), NCSNError)
    return run_cfg, ckpt


WEIGHTS = {"ema": "EMA", "raw": "raw"}  # the weights of a loss or a sample: its tag's name -> its log lines' name


def sampling_weights(config):
    """The weights that --sample, --eval, the snapshot grid and the test loss of training use: "ema", the
    exponential moving average, with model.ema and sampling.ema on; else "raw", the optimised weights (which the
    training loss always uses)."""
    return "ema" if config.model.ema and config.sampling.ema else "raw"


def trained_network(run_cfg, ckpt, ckpt_path, device, seed, batch, world=1):
    """The score function of the checkpoint `ckpt` (read_trained) on `device` and its sigmas: the EMA weights with
    model.ema and sampling.ema on, the network compiled as fast: asks, built at the first sampling batch's size
    `batch` before the first step (compile_model)."""
    sigmas = config_sigmas(run_cfg).to(device)
    run_cfg = sampling_path(run_cfg, device, batch, sigmas, world)
    devices.set_precision(run_cfg, device)
    model = make_model(run_cfg, device)
    use_ema = sampling_weights(run_cfg) == "ema"
    load_model_state(model, ckpt["ema"] if use_ema else ckpt["model"], ckpt_path)
    compile_model(model.eval(), run_cfg, warm_up_sampling(run_cfg, device, batch))
    log.info("model of step %d%s; %s sampling, %d levels x %d steps, step_lr %g%s, seed %d", ckpt["step"],
             " (EMA weights)" if use_ema else "", run_cfg.sampling.sampler, len(sigmas), run_cfg.sampling.n_steps_each,
             run_cfg.sampling.step_lr, ", final denoising step" if run_cfg.sampling.denoise else "", seed)
    return make_score_fn(model, run_cfg, device, sigmas), sigmas


def load_trained(ckpt_path, config, device, seed, n=None):
    """read_trained and trained_network in one: (config, score function, sigmas on the device, step) for drawing
    `n` samples in batches of sampling.batch_size (default: sampling.n_samples)."""
    run_cfg, ckpt = read_trained(ckpt_path, config)
    n = run_cfg.sampling.n_samples if n is None else n
    score_fn, sigmas = trained_network(run_cfg, ckpt, ckpt_path, device, seed, min(n, run_cfg.sampling.batch_size))
    return run_cfg, score_fn, sigmas, ckpt["step"]


# ----------------------------------------------------------------------------------------------------------
# The speed path (speedpath.py): what is timed for each candidate, on a network of its own


def training_path(config, device, world, batch, sigmas, ckpt, loss):
    """(config on the training path, its name) for a training command of `world` ranks at `batch` images a rank
    that starts from `ckpt` (None: step 1); `loss` is the DSM loss (runner.dsm_loss). A resume keeps the path that
    trained the checkpoint's last steps on this machine, so that it is the same as an unbroken run."""
    step_of = timed_training_step(device, batch, sigmas, loss)
    cfg, name, why = speedpath.choose(config, device, "train", batch, step_of, world=world,
                                      deterministic=torch.are_deterministic_algorithms_enabled(),
                                      keep=speedpath.kept_path(ckpt, device))
    speedpath.log_choice("training", name, why)
    for r in (ckpt.get("speed_paths") or []) if ckpt else []:
        log.info("steps %d to %d were trained on %s (%s)", r["first"], r["last"], r["path"], r["machine"])
    return cfg, name


def sampling_path(config, device, batch, sigmas, world=1):
    """The config of a sampling command at `batch` images on its speed path (logged)."""
    cfg, name, why = speedpath.choose(config, device, "sample", batch, timed_sampling_step(device, batch, sigmas),
                                      deterministic=torch.are_deterministic_algorithms_enabled(), world=world)
    speedpath.log_choice("sampling", name, why)
    return cfg


def timed_training_step(device, batch, sigmas, loss):
    """speedpath.choose's step_of for training: a fresh network of the candidate's config, its Adam, and one DSM
    step of `batch` random images (the run's network, optimizer and generators are not touched)."""
    def step_of(cfg):
        model = make_model(cfg, device)
        compile_or_fall_back(model, cfg, warm_up_training(cfg, device, batch))  # as compile_model, without its log
        optimizer, score_fn = make_optimizer(cfg, model), make_score_fn(model, cfg, device, sigmas)
        g = torch.Generator(device).manual_seed(0)
        x = torch.rand(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, generator=g,
                       device=device)  # (B, 1, 28, 28)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss(score_fn, x, sigmas, g)[0].mean().backward()
            optimizer.step()
        return step
    return step_of


def timed_sampling_step(device, batch, sigmas):
    """speedpath.choose's step_of for sampling: one network evaluation of `batch` images under inference_mode, as
    a Langevin step makes it, on a network of the candidate's config (its speed does not depend on the weights)."""
    def step_of(cfg):
        model = make_model(cfg, device).eval()
        compile_or_fall_back(model, cfg, warm_up_sampling(cfg, device, batch))
        score_fn = make_score_fn(model, cfg, device, sigmas)
        x, labels = zeros_batch(cfg, device, batch)
        x.uniform_()

        def step():
            with torch.inference_mode():
                score_fn(x, labels)
        return step
    return step_of
