"""The authors' NCSN checkpoints (ermongroup/ncsn): their parameter names mapped onto model.py's.

Their checkpoint.pth is the list [state_dict of a DataParallel-wrapped CondRefineNetDilated, Adam state]; their
names differ from ours in four places, everything else is the same path:
    normalizer.*                          -> end_norm.*
    <block>.normalize1 / normalize2       -> <block>.norm1 / norm2
    refineK.adapt_convs.j.<b>_<s>_norm    -> refineK.adapt.j.norms.<2(b-1) + (s-1)>   (and _conv -> convs)
    refineK.output_convs.<b>_<s>_norm     -> refineK.out.norms.<2(b-1) + (s-1)>       (and _conv -> convs)
The mapping is checked to be total both ways, with matching shapes, before anything is loaded.
"""
import logging
import os
import re
import zipfile

import torch
import yaml

from common import NCSNError, atomic_torch_save

log = logging.getLogger("ncsn")

DATAPARALLEL_PREFIX = "module."
RCU_STAGES = 2  # stages per block of their CondRCUBlock (and ours)
_RCU = re.compile(r"(adapt_convs\.\d+|output_convs)\.(\d+)_(\d+)_(norm|conv)\.")


def our_name(their_name):
    """Our parameter name for one of theirs (with or without DataParallel's 'module.' prefix)."""
    k = their_name[len(DATAPARALLEL_PREFIX):] if their_name.startswith(DATAPARALLEL_PREFIX) else their_name
    k = re.sub(r"^normalizer\.", "end_norm.", k)
    k = re.sub(r"\.normalize([12])\.", r".norm\1.", k)
    k = _RCU.sub(lambda m: f"{m.group(1)}.{m.group(4)}s.{(int(m.group(2)) - 1) * RCU_STAGES + int(m.group(3)) - 1}.",
                 k)
    return k.replace("adapt_convs.", "adapt.").replace("output_convs.", "out.")


def map_state_dict(theirs, ours_template, source="checkpoint"):
    """Their model state dict renamed to ours. `ours_template` is our model's state_dict() (names and shapes).
    Every key of theirs must map to exactly one of ours and back, with the same shape: otherwise a one-line
    NCSNError naming the first offending key."""
    mapped = {}
    for k, v in theirs.items():
        name = our_name(k)
        if name in mapped:
            raise NCSNError(f"{source}: two of its parameters map to {name} (one is {k})")
        if name not in ours_template:
            raise NCSNError(f"{source}: parameter {k} has no counterpart in model.py (it would be {name})")
        if tuple(v.shape) != tuple(ours_template[name].shape):
            raise NCSNError(f"{source}: parameter {k} has shape {tuple(v.shape)}, model.py's {name} has "
                            f"{tuple(ours_template[name].shape)}")
        mapped[name] = v
    missing = [k for k in ours_template if k not in mapped]
    if missing:
        raise NCSNError(f"{source}: model.py's parameter {missing[0]} is missing from it"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return mapped


# ----------------------------------------------------------------------------------------------------------
# --import_authors: their run folder (or checkpoint.pth) into a run of this repository

NAMESPACE_TAG = "tag:yaml.org,2002:python/object:argparse.Namespace"
PAPER_SAMPLING = {"n_steps_each": 100, "step_lr": 0.00002}  # their runner's sampler (not in their config)


class _NamespaceLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads argparse.Namespace objects, as plain mappings (nothing is executed)."""


_NamespaceLoader.add_constructor(NAMESPACE_TAG, lambda loader, node: loader.construct_mapping(node, deep=True))


def read_their_config(path):
    """Their config.yml (a yaml.dump of an argparse.Namespace) as a nested dict; one-line errors."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_NamespaceLoader)  # noqa: S506 (a SafeLoader plus the Namespace tag only)
    except (OSError, yaml.YAMLError) as e:
        raise NCSNError(f"cannot read the authors' config {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s), dict) for s in ("data", "model", "training", "optim")):
        raise NCSNError(f"{path} is not a config of the authors' NCSN code (no data, model, training, optim sections)")
    return raw


def their_files(path):
    """(checkpoint.pth, config.yml or None) for their run folder or their checkpoint.pth."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, "checkpoint.pth")
        if not os.path.isfile(ckpt):
            raise NCSNError(f"{path} holds no checkpoint.pth: pass the authors' run folder run/logs/<doc>")
    elif os.path.isfile(path):
        ckpt = path
    else:
        raise NCSNError(f"no such file or folder: {path}")
    cfg = os.path.join(os.path.dirname(ckpt), "config.yml")
    return ckpt, cfg if os.path.isfile(cfg) else None


def read_their_checkpoint(path):
    """Their [model state dict, Adam state dict], checked to be that shape and, when it is a zip archive (torch
    1.6 and later), every member against its CRC-32 first; weights_only load."""
    from checkpoint import damage

    if zipfile.is_zipfile(path):
        try:
            problem = damage(path)
        except OSError as e:
            raise NCSNError(f"cannot read {path}: {e.strerror or e}") from e
        if problem is not None:
            raise NCSNError(f"{path} is {problem}: unpack or download the authors' checkpoint again")
    elif os.path.isfile(path):
        log.warning("%s is not a zip archive (torch's format before 1.6?): it holds no checksums and cannot be "
                    "verified", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises one of several types
        raise NCSNError(f"{path} is not readable as a checkpoint ({type(e).__name__})") from e
    if isinstance(ckpt, dict) and "format" in ckpt:
        raise NCSNError(f"{path} is a checkpoint of this repository, not of the authors' code: use it as it is")
    if not (isinstance(ckpt, (list, tuple)) and len(ckpt) >= 2 and isinstance(ckpt[0], dict)
            and isinstance(ckpt[1], dict) and f"{DATAPARALLEL_PREFIX}begin_conv.weight" in ckpt[0]):
        raise NCSNError(f"{path} is not a checkpoint of the authors' NCSN code (expected the list "
                        f"[score network state dict, optimizer state dict])")
    return ckpt[0], ckpt[1]


def shape_facts(state):
    """(channels, ngf, number of noise levels) read off their tensors."""
    conv = state[f"{DATAPARALLEL_PREFIX}begin_conv.weight"]  # (ngf, channels, 3, 3)
    embed = state.get(f"{DATAPARALLEL_PREFIX}normalizer.embed.weight")  # (L, 3 ngf)
    if embed is None:
        raise NCSNError("the checkpoint has no normalizer.embed.weight: not the authors' CondRefineNetDilated")
    return int(conv.shape[1]), int(conv.shape[0]), int(embed.shape[0])


def our_config(theirs, channels, ngf, n_levels, source):
    """This repository's config dict for their run: their data, model, training and optim settings, the paper's
    sampler, the plain fp32 path; ngf and the number of levels checked against the tensors."""
    d, m, t, o = theirs["data"], theirs["model"], theirs["training"], theirs["optim"]
    if d.get("dataset") != "MNIST" or channels != 1 or d.get("image_size") != 28:
        raise NCSNError(f"{source} is a {d.get('dataset', '?')} model ({channels} channels, {d.get('image_size', '?')} "
                        f"pixels, ngf {ngf}): this repository runs MNIST only (1 channel, 28 pixels)")
    for key, value in (("ngf", ngf), ("num_classes", n_levels)):
        if m.get(key) != value:
            raise NCSNError(f"{source}: its config says model.{key} = {m.get(key)!r}, its tensors say {value}")
    return {
        "training": {"batch_size": t["batch_size"], "n_epochs": t["n_epochs"], "n_iters": t["n_iters"],
                     "snapshot_freq": t["snapshot_freq"], "anneal_power": float(t.get("anneal_power", 2.0))},
        "data": {"dataset": "MNIST", "image_size": 28, "channels": 1, "logit_transform": bool(d["logit_transform"])},
        "model": {"sigma_begin": float(m["sigma_begin"]), "sigma_end": float(m["sigma_end"]),
                  "num_classes": n_levels, "ngf": ngf},
        "optim": {"optimizer": "Adam", "lr": float(o["lr"]), "beta1": float(o["beta1"]),
                  "weight_decay": float(o["weight_decay"]), "amsgrad": bool(o["amsgrad"])},
        "sampling": {**PAPER_SAMPLING, "init": "uniform"},  # the paper's start
        "fast": {"bf16": False, "fast_kernels": False, "fused_adam": False, "channels_last": False},
    }


def map_adam_state(their_optim, their_names, model, config):
    """Our Adam optimizer over `model`, holding their Adam state re-indexed to our parameter order (Adam keys its
    state by position)."""
    from build import make_optimizer

    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state = {index[our_name(their_names[i])]: s for i, s in their_optim.get("state", {}).items()}
    optimizer = make_optimizer(config, model)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    except (KeyError, ValueError, RuntimeError) as e:
        raise NCSNError(f"the authors' optimizer state does not fit the network: {e}") from e
    return optimizer


def import_authors(path, run, seed):
    """--import_authors PATH --doc NAME: write the run folder of `run` (rundir.Run; checkpoint.pth, config.yml) from
    their run folder or checkpoint.pth `path`, its generator seeded with `seed`; nothing is written unless every
    check passes."""
    from checkpoint import make_checkpoint
    from build import make_model
    from schema import ConfigError, config_from_dict, config_to_dict

    if os.path.exists(run.log_dir) or os.path.exists(run.tb_dir):
        raise NCSNError(f"run folder {run.log_dir} already exists: pick another --doc")
    ckpt_path, cfg_path = their_files(path)
    state, their_optim = read_their_checkpoint(ckpt_path)
    channels, ngf, n_levels = shape_facts(state)
    if cfg_path is None:
        raise NCSNError(f"no config.yml beside {ckpt_path}: pass the authors' run folder, which holds both")
    raw = our_config(read_their_config(cfg_path), channels, ngf, n_levels, ckpt_path)
    try:
        config = config_from_dict(raw, source=f"config built from {cfg_path}")
    except ConfigError as e:
        raise NCSNError(str(e)) from e
    model = make_model(config, torch.device("cpu"))
    model.load_state_dict(map_state_dict(state, model.state_dict(), source=ckpt_path))
    optimizer = map_adam_state(their_optim, list(state), model, config)
    # step 0: unknown, their checkpoint does not record it
    checkpoint = make_checkpoint(config, model, None, optimizer, torch.Generator().manual_seed(seed), 0, seed)
    try:
        os.makedirs(run.log_dir)
        with open(os.path.join(run.log_dir, "config.yml"), "w") as f:
            yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
        atomic_torch_save(checkpoint, run.ckpt_path)
    except OSError as e:
        raise NCSNError(f"cannot write the run folder {run.log_dir}: {e.strerror}") from e
    log.info("imported %s (ngf %d, %d levels, %d parameters) into %s; its step is unknown and recorded as 0",
             ckpt_path, ngf, n_levels, sum(p.numel() for p in model.parameters()), run.log_dir)
    return 0
