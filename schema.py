"""The config schema of NCSN-MNIST: one frozen dataclass per YAML section, validated once.

`load_config(path)` reads config.yml with yaml.safe_load and returns a read-only `Config`; any unknown,
missing, wrongly typed or out-of-range key raises `ConfigError` with a one-line message naming the key.
`config_to_dict` gives the plain nested dict written to run/logs/<doc>/config.yml and into checkpoints.
"""
import dataclasses
import math
import re
import typing

import yaml

# Every key of config.yml is a field here; keys without a default must be in the YAML.
# Section and key names are the ones of the authors' configs. Instances are frozen (read-only).

@dataclasses.dataclass(frozen=True)
class Training:
    batch_size: int  # images per optimisation step
    n_epochs: int  # stop after this many passes over the training set ...
    n_iters: int  # ... or this many steps, whichever comes first (10 epochs of MNIST at 128 = 4,690 steps)
    snapshot_freq: int  # write checkpoint_<step>.pth every this many steps
    test_freq: int = 100  # DSM loss on a test batch every this many steps
    log_freq: int = 10  # read the training loss back from the device every this many steps
    keep_snapshots: int = 0  # keep only the newest k checkpoint_<step>.pth; 0 keeps all
    anneal_power: float = 2.0  # lambda(sigma) = sigma ** anneal_power weights each level (eq. 6)
    max_minutes: float = 0.0  # wall-clock budget of one training command, from its start: stop at the first step
    # past it (torchrun: log step), with a checkpoint as at n_iters; a resume trains for another budget; 0 = none
    budget_includes_sampling: bool = False  # max_minutes covers one --sample of the run as well: training stops
    # earlier by the time that sampling is measured to take on this machine (timed when training starts)
    snapshot_grid: int = 0  # at each numbered snapshot, draw this many samples into TensorBoard and
    # <run>/logs/<doc>/snapshot_grids/ with snapshot_steps_each Langevin steps a level; 0 = off
    snapshot_steps_each: int = 5  # the snapshot grid's steps a level (its step_lr: NCSNv2's rule for this T)
    stratified_levels: bool = False  # false: a random level for each image (the paper). true: each global batch
    # gives every level the same share, batch // L images (the remainder to levels drawn at random), in random order


@dataclasses.dataclass(frozen=True)
class Data:
    dataset: str  # only MNIST
    image_size: int  # 28
    channels: int  # 1
    logit_transform: bool  # model the data in logit space instead of [0, 1]
    root: str = "run/datasets"  # torchvision.datasets.MNIST root: files in <root>/MNIST/raw


@dataclasses.dataclass(frozen=True)
class Model:
    sigma_begin: float  # largest noise level sigma_1
    sigma_end: float  # smallest noise level sigma_L
    num_classes: int  # L, the number of noise levels (geometric between the two)
    ngf: int  # base width of the RefineNet (64 in the paper)
    ema: bool = False  # keep an exponential moving average of the weights (NCSNv2, technique 5)
    ema_rate: float = 0.999  # its decay per step (after the warm-up)
    ema_warmup: bool = True  # decay min(ema_rate, (1 + t) / (10 + t)) at step t, so early weights fade fast
    scale_by_sigma: bool = False  # s(x, sigma_i) = f(x, i) / sigma_i, as the NCSNv2 network (technique 3)


@dataclasses.dataclass(frozen=True)
class Optim:
    optimizer: str  # only Adam
    lr: float  # learning rate
    beta1: float  # Adam beta1 (beta2 is 0.999)
    weight_decay: float  # L2 penalty
    amsgrad: bool  # AMSGrad variant of Adam
    lr_schedule: str = "constant"  # constant: lr at every step (the paper). cosine: after the warm-up, lr decays as
    # 0.5 (1 + cos(pi p)) to 0 at the run's last step, p its progress; the last step is the run's n_iters (or
    # n_epochs), so a resume with a larger n_iters stretches the rest of the decay
    warmup: int = 0  # the first `warmup` steps raise the lr linearly from lr / warmup to lr; 0 = none


LR_SCHEDULES = ("constant", "cosine")  # optim.lr_schedule (runner.learning_rate)
SAMPLING_INITS = ("uniform", "gaussian")  # sampling.init: the chain's start (runner.initial_samples)
SAMPLERS = ("langevin", "consistent")  # sampling.sampler (runner.run_sampler)


@dataclasses.dataclass(frozen=True)
class Sampling:
    n_steps_each: int  # T, Langevin steps per noise level (Algorithm 1)
    step_lr: float  # the step at level i is step_lr * sigma_i^2 / sigma_L^2 (the paper's epsilon is 2 * step_lr)
    n_samples: int = 100  # images drawn by --sample (shown as a square-ish grid)
    batch_size: int = 100  # images per sampling batch
    n_frames: int = 100  # frames of movie.gif along the trajectory
    denoise: bool = False  # after the last level, one step x <- x + sigma_L^2 s(x, sigma_L) (NCSNv2, appendix)
    ema: bool = True  # sample, score and compute the test loss with the EMA weights when the run keeps them
    init: str = "gaussian"  # the chain's start: gaussian, MNIST's mean pixel + sigma_1 z, or uniform: U[0, 1] (the
    # paper's, from which the first level can hold the chain at a white background:
    # docs/design.md#why-the-chain-starts-at-the-mean-pixel)
    sampler: str = "langevin"  # langevin: annealed Langevin dynamics (Algorithm 1). consistent: consistent annealed
    # sampling (Jolicoeur-Martineau et al., 2021), one step a level over (L - 1) n_steps_each + 1 levels
    guidance_scale: float = 10.0  # w of --sample --digit: s + w grad log p(y | x, sigma_i) (guidance.py): at 10, 97% of
    # the samples asked to be a 3 were classified 3 (docs/results.md#guidance-with-the-shipped-step_lr); 0 = off


@dataclasses.dataclass(frozen=True)
class Eval:
    """Sample quality (metrics.py): FID, KID and Inception-style score on an MNIST digit classifier."""
    n_samples: int = 10000  # images drawn and scored by --eval, on every device: FID depends on the count, so
    # only figures at one count compare (docs/design.md#measuring-samples); 10,000 take hours on a CPU at ngf 64
    loss_images: int = 10000  # test images in --eval's DSM loss per noise level, on every device (10,000: all)
    every_snapshots: int = 0  # during training: metrics of n_training samples every k snapshots; 0 = off
    n_training: int = 300  # images scored during training
    max_minutes: float = 0.0  # --eval stops drawing at a batch's end before this many minutes (0: no limit); the
    # samples so far stay in the run folder (eval_partial_<step>.pt) and the same --eval goes on from them


@dataclasses.dataclass(frozen=True)
class Fast:
    """Speed switches; none of them changes the method (bench/speed.py measures each path)."""
    auto: bool = True  # time the speed paths (fp32 x NCHW or channels_last; for sampling bf16 too where native) on
    # this machine at the start and run the fastest, cached per machine (speedpath.py); off: fast.bf16 and
    # fast.channels_last pin the path (training in bf16 only so: speedpath.BF16_TRAINING)
    bf16: bool = False  # bf16 autocast (fp32 master weights; the input and output convolutions stay fp32)
    fast_kernels: bool = True  # same functions, faster kernels: ELU, CIN++ statistics, 5x5 mean pool (model.py)
    fused_adam: bool = True  # one fused kernel for the Adam update
    channels_last: bool = False  # NHWC: faster at ngf 8 on the CPU measured (docs/speed.md); no figure at ngf 64
    tf32: bool = False  # CUDA only: TF32 matmuls and convolutions (10-bit mantissa); off = true fp32
    cudnn_benchmark: bool = False  # CUDA only: let cuDNN time its kernels and keep the fastest (off with --deterministic)
    compile: bool = False  # torch.compile the network for training and sampling (fp32: the same sums, fused);
    # compiling takes minutes on a CPU, once per process and once more for a new batch size
    compile_norms: bool = False  # torch.compile only each CIN++ with the ELU after it (model.cin_plus_elu), for
    # training and sampling; the convolutions stay eager: seconds to compile instead of minutes (fast.compile wins)


@dataclasses.dataclass(frozen=True)
class Config:
    training: Training
    data: Data
    model: Model
    optim: Optim
    sampling: Sampling
    eval: Eval = Eval()  # optional section
    fast: Fast = Fast()  # optional section


RULES = [  # (key, test, what it must be): checked once, after the types
    ("training.batch_size", lambda v: v >= 1, ">= 1"),
    ("training.n_epochs", lambda v: v >= 1, ">= 1"),
    ("training.n_iters", lambda v: v >= 1, ">= 1"),
    ("training.snapshot_freq", lambda v: v >= 1, ">= 1"),
    ("training.test_freq", lambda v: v >= 1, ">= 1"),
    ("training.log_freq", lambda v: v >= 1, ">= 1"),
    ("training.keep_snapshots", lambda v: v >= 0, ">= 0 (0 keeps all)"),
    ("training.max_minutes", lambda v: v >= 0, ">= 0 (0 = no budget)"),
    ("training.snapshot_grid", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("training.snapshot_steps_each", lambda v: v >= 1, ">= 1"),
    ("data.dataset", lambda v: v == "MNIST", "MNIST"),
    ("data.image_size", lambda v: v == 28, "28 (MNIST)"),
    ("data.channels", lambda v: v == 1, "1 (MNIST)"),
    ("model.sigma_end", lambda v: v > 0, "> 0"),
    ("model.sigma_begin", lambda v: v > 0, "> 0"),
    ("model.num_classes", lambda v: v >= 1, ">= 1"),
    ("model.ngf", lambda v: v >= 1, ">= 1"),
    ("optim.optimizer", lambda v: v == "Adam", "Adam"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.lr_schedule", lambda v: v in LR_SCHEDULES, " or ".join(LR_SCHEDULES)),
    ("optim.warmup", lambda v: v >= 0, ">= 0 (0 = none)"),
    ("sampling.n_steps_each", lambda v: v >= 1, ">= 1"),
    ("sampling.step_lr", lambda v: v > 0, "> 0"),
    ("sampling.n_samples", lambda v: v >= 1, ">= 1"),
    ("sampling.batch_size", lambda v: v >= 1, ">= 1"),
    ("sampling.n_frames", lambda v: v >= 1, ">= 1"),
    ("sampling.init", lambda v: v in SAMPLING_INITS, " or ".join(SAMPLING_INITS)),
    ("sampling.sampler", lambda v: v in SAMPLERS, " or ".join(SAMPLERS)),
    ("sampling.guidance_scale", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("model.ema_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eval.n_samples", lambda v: v >= 2, ">= 2"),
    ("eval.every_snapshots", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("eval.loss_images", lambda v: v >= 1, ">= 1"),
    ("eval.n_training", lambda v: v >= 2, ">= 2"),
    ("eval.max_minutes", lambda v: v >= 0, ">= 0 (0 = no limit)"),
]


class ConfigError(ValueError):
    """A bad config: the message names the key. Exit status 2."""


def _check_value(key, value, typ):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # YAML `1` for a float key is fine
    if typ is float and isinstance(value, str):
        try:
            float(value)
            hint = " (a number in quotes: remove the quotes)"
        except ValueError:
            hint = ""
        raise ConfigError(f"config key {key}: expected a number, got the text {value!r}{hint}")
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    if typ is float and not math.isfinite(value):
        raise ConfigError(f"config key {key}: expected a finite number, got {value!r}")
    return value


def config_from_dict(raw, source="config"):
    """Validate a nested dict (as yaml.safe_load gives) and build the frozen Config. Raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    types = typing.get_type_hints(Config)
    for key in raw:
        if key not in types:
            raise ConfigError(f"{source}: unknown section {key!r} (known: {', '.join(types)})")
    for name, cls in types.items():
        optional = all(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))
        if name not in raw and not optional:
            raise ConfigError(f"{source}: missing section {name!r}")
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in values:
            if (name, key) in RETIRED_KEYS:
                raise ConfigError(f"config key {name}.{key}: no longer used: --eval counts the same on every "
                                  f"device; set {'.'.join(RETIRED_KEYS[name, key])} instead")
            if key not in fields:
                raise ConfigError(f"config key {name}.{key}: unknown key (known: {', '.join(fields)})")
        kwargs = {}
        for key, f in fields.items():
            if key not in values:
                if f.default is dataclasses.MISSING:
                    raise ConfigError(f"config key {name}.{key}: missing")
                continue
            kwargs[key] = _check_value(f"{name}.{key}", values[key], hints[key])
        sections[name] = cls(**kwargs)
    config = Config(**sections)
    for key, test, want in RULES:
        section, field = key.split(".")
        value = getattr(getattr(config, section), field)
        if not test(value):
            raise ConfigError(f"config key {key}: must be {want}, got {value!r}")
    if config.model.sigma_begin <= config.model.sigma_end:
        raise ConfigError(f"config key model.sigma_begin: must be > model.sigma_end "
                          f"({config.model.sigma_begin} <= {config.model.sigma_end})")
    return config


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads a number in exponent form without a dot (2e-5, 1E3) as a float, as YAML 1.2
    and Python do; PyYAML follows YAML 1.1, which reads it as text. Config files and --set both read through it."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+0123456789."))


def apply_sets(raw, sets):
    """A copy of the nested config dict `raw` with each of `sets` ("section.key=value", main.py --set) applied;
    values are read as the config file's (ConfigLoader: 4000 -> int, 1e-4 -> float, true -> bool, langevin -> str). The result is
    validated like a file by config_from_dict, so an unknown key or a bad value is the same one-line error."""
    if not isinstance(raw, dict):
        return raw  # config_from_dict names the problem
    raw = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    for item in sets:
        key, eq, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not section or not name or "." in name:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key as in the YAML, "
                              f"e.g. --set training.n_iters=4000")
        try:
            value = yaml.load(text, Loader=ConfigLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from e
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping")
        raw.setdefault(section, {})[name] = value
    return raw


def read_yaml(path):
    """The nested dict of a YAML config file (ConfigLoader); a one-line ConfigError if unreadable, not text (a
    damaged byte), not YAML or empty."""
    try:
        with open(path, "rb") as f:  # bytes: PyYAML checks the encoding, and a damaged byte is a ReaderError
            raw = yaml.load(f, Loader=ConfigLoader)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"config {path} is damaged: byte {e.position} is not YAML text ({e.reason})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if raw is None:
        raise ConfigError(f"config {path} is empty (no settings in it)")
    return raw


def load_config(path, sets=(), hint=""):
    """Read a YAML file, apply --set overrides and validate the result once. Raises ConfigError, whose message
    names the file and ends with `hint` (the way out) where the file itself is at fault."""
    source = f"config {path}" + (" with --set" if sets else "")
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"{e}{hint}") from e
    raw = apply_sets(with_retired_keys(raw), sets)
    try:
        return config_from_dict(raw, source=source)
    except ConfigError as e:
        raise ConfigError(f"{e}{hint}" if str(e).startswith(source) else f"{source}: {e}{hint}") from e


# Keys added after a checkpoint format was in use whose old behaviour is not their default: a checkpoint's config
# that lacks one was trained with this value. A missing key whose default is the old behaviour needs no entry.
LEGACY_VALUES = {("model", "ema_warmup"): False, ("sampling", "init"): "uniform", ("fast", "auto"): False}


# Keys that were dropped, and the key that holds their value now. eval.n_samples_cpu and eval.loss_images_cpu were
# --eval's counts on the CPU (eval.n_samples and eval.loss_images were a GPU's); --eval now draws one count on every
# device. An older config's CPU counts become its counts: every figure recorded so far was drawn on a CPU.
RETIRED_KEYS = {("eval", "n_samples_cpu"): ("eval", "n_samples"), ("eval", "loss_images_cpu"): ("eval", "loss_images")}


def with_retired_keys(raw):
    """A copy of a config dict (a file's or a checkpoint's) with each key of RETIRED_KEYS moved to its successor (whose
    value it replaces), so that the config of an older run still loads and --eval scores it at the count it used."""
    if not isinstance(raw, dict):
        return raw  # config_from_dict names the problem
    raw = {s: dict(v) if isinstance(v, dict) else v for s, v in raw.items()}
    for (section, key), (new_section, new_key) in RETIRED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raw.setdefault(new_section, {})[new_key] = raw[section].pop(key)
    return raw


def with_legacy_values(raw):
    """A copy of a checkpoint's config dict with the keys it predates filled in with LEGACY_VALUES and its retired
    keys moved (with_retired_keys)."""
    raw = with_retired_keys(raw)
    for (section, key), value in LEGACY_VALUES.items():
        if isinstance(raw.get(section), dict):
            raw[section].setdefault(key, value)
    return raw


def config_to_dict(config):
    """Plain nested dict of builtins: what config.yml and the checkpoint hold."""
    return dataclasses.asdict(config)
