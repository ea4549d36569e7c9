"""Command line for NCSN on MNIST: flags + YAML config -> one read-only config and plain values (the run, the seed,
the checkpoint file, the output folder) -> the module of the command. The only module that reads the flags.

    python main.py --config config.yml --doc mnist               # train into run/logs/mnist
    python main.py --doc mnist --resume_training                 # continue it, with its own config.yml
    python main.py --doc mnist --resume_training --set training.n_iters=9000   # ... and train further
    python main.py --doc mnist --sample                          # annealed Langevin dynamics -> run/logs/mnist/samples
    python main.py --doc mnist --sample --ckpt 1000 -o s1000     # from checkpoint_1000.pth
    python main.py --doc mnist --sample --digit 7 -o sevens      # classifier guidance (guidance.py)
    python main.py --doc mnist --show_config                     # the run's config, defaults included
    python main.py --import_authors THEIR_RUN --doc authors      # the authors' checkpoint as a run of ours

Exit status: 0 on success, 2 for a bad command line or config, 1 for any other error, 128 + signal
number when training was stopped by SIGINT or SIGTERM (after writing a checkpoint).
"""
import argparse
import datetime
import logging
import os
import re
import sys

from progress import PROGRESS_SECONDS, setup_logging
from schema import ConfigError, config_to_dict, load_config

log = logging.getLogger("ncsn")
COLLECTIVE_TIMEOUT_MIN = 30  # how long a rank waits at a collective under torchrun (e.g. while rank 0 trains
#                              the metrics classifier) before the run fails with a timeout


MODES = ("resume_training", "sample", "eval", "inpaint", "import_authors", "noise_design", "verify", "show_config")
RUN_CONFIG_MODES = ("resume_training", "sample", "eval", "inpaint", "show_config")  # read the run's own config.yml
SAMPLE_MODES = ("sample", "eval", "inpaint")  # use a trained checkpoint: --ckpt, and only these --set sections
SAMPLE_SETTABLE = ("sampling.", "eval.", "fast.", "data.root=")  # what --set may change for SAMPLE_MODES


def parse_device(name):
    """--device's spelling (torch is not imported yet): auto, cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def parse_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def parse_args(argv=None):
    p = Parser(description="Noise Conditional Score Networks (Song & Ermon, 2019) on MNIST")
    p.add_argument("--config", default=None,
                   help="YAML config of a new run (default config.yml); other commands read the run's own "
                        "run/logs/DOC/config.yml, and with --resume_training --config may change its resumable keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, dotted as in the YAML (repeatable), e.g. --set training.n_iters=4000")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--run", default="run", help="output root: logs/<doc>, tensorboard/<doc> under it")
    p.add_argument("--doc", default=None, help="name of the run (a folder under run/logs); needed by every command "
                                               "but --noise_design")
    p.add_argument("--comment", default="", help="free text recorded in the log")
    p.add_argument("--verbose", default="info", choices=["info", "debug", "warning", "critical"],
                   help="log level; 'debug' also prints tracebacks")
    p.add_argument("--progress", type=parse_seconds, default=PROGRESS_SECONDS, metavar="SECONDS",
                   help=f"when stderr is not a terminal, a progress line at least this often "
                        f"(default {PROGRESS_SECONDS:g}); on a terminal, progress bars")
    p.add_argument("--device", default="auto", type=parse_device, metavar="DEVICE",
                   help="auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps; default auto")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (bitwise repeatable on CUDA, slower; an op without one is an error)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--resume_training", action="store_true", help="continue the run from its newest checkpoint")
    modes.add_argument("--sample", "--test", dest="sample", action="store_true",
                       help="draw samples from the run's checkpoint with annealed Langevin dynamics")
    modes.add_argument("--eval", action="store_true",
                       help="FID and Inception-style score of the run's checkpoint, and its test loss per noise level")
    modes.add_argument("--inpaint", choices=["bottom", "right", "square", "random"],
                       help="complete MNIST test digits with this region hidden, using the run's checkpoint")
    modes.add_argument("--import_authors", metavar="PATH",
                       help="make run --doc from the authors' NCSN run folder run/logs/<doc> (or its checkpoint.pth)")
    modes.add_argument("--noise_design", action="store_true",
                       help="print the NCSNv2 noise levels and step size that the data and config call for")
    modes.add_argument("--verify", action="store_true",
                       help="check every checkpoint of the run and print one line each (step, size, ok or what is wrong)")
    modes.add_argument("--show_config", action="store_true",
                       help="print the resolved config (the run's, or --config's) with --set applied, defaults included")
    p.add_argument("--ckpt", metavar="STEP|PATH",
                   help="with --sample, --eval, --inpaint: checkpoint_STEP.pth of the run, or a checkpoint file "
                        "(default: the run's checkpoint.pth)")
    p.add_argument("--digit", choices=[str(d) for d in range(10)] + ["all"],
                   help="with --sample: draw this digit, or one row per digit, by classifier guidance (guidance.py)")
    p.add_argument("--guidance_scale", type=float, metavar="W",
                   help="with --digit: the guidance scale w >= 0 (default: the config's sampling.guidance_scale)")
    p.add_argument("-o", "--image_folder", default=None,
                   help="where --sample and --inpaint write (default: a folder in run/logs/DOC named for what is "
                        "drawn: samples, samples_digit3, samples_ckpt1000, inpaint, ...)")
    p.add_argument("--overwrite", action="store_true", help="let --sample replace outputs already in -o")
    args = p.parse_args(argv)
    mode = next((m for m in MODES if getattr(args, m)), None)
    if args.doc is None and mode != "noise_design" and not (mode == "show_config" and args.config):
        p.error("--doc NAME is required: the run's folder under <run>/logs (e.g. --doc quick)")
    if args.doc is not None and (args.doc in ("", ".", "..") or "/" in args.doc or "\\" in args.doc):
        p.error(f"--doc must be a plain folder name, got {args.doc!r}")
    if args.digit is not None and not args.sample:
        p.error("--digit goes with --sample")
    if args.guidance_scale is not None and (args.digit is None or not 0 <= args.guidance_scale < float("inf")):
        p.error(f"--guidance_scale goes with --digit and must be a number >= 0, got {args.guidance_scale}")
    if args.ckpt is not None and mode not in SAMPLE_MODES:
        p.error("--ckpt goes with --sample, --eval or --inpaint")
    if args.image_folder is not None and mode not in ("sample", "inpaint"):
        p.error("-o goes with --sample or --inpaint")
    if mode in SAMPLE_MODES:
        fixed = [s for s in args.set if not s.strip().startswith(SAMPLE_SETTABLE)]
        if fixed:
            p.error(f"--set {fixed[0]}: --{mode} takes the trained model's settings from its checkpoint; only "
                    f"sampling.*, eval.*, fast.* and data.root may be set")
    if mode in ("verify", "import_authors") and args.set:
        p.error(f"--set does not apply to --{mode}: it " + ("checks the files as they are" if mode == "verify" else
                "takes the authors' settings; change the imported run's sampling with --set on --sample"))
    args.mode = mode
    return args


def run_config_path(args):
    return os.path.join(args.run, "logs", args.doc, "config.yml")


def resolve_config(args):
    """The one config of this command, validated once (or None where the checkpoint's own is used): a new run's
    --config (default config.yml); for the commands on a run, its own run/logs/DOC/config.yml unless --config
    is given; --set applied on top. --import_authors and --verify build or need none."""
    if args.mode in ("import_authors", "verify"):
        return None
    if args.mode in RUN_CONFIG_MODES and args.config is None and args.doc is not None:
        path = run_config_path(args)
        if os.path.isfile(path):
            return load_config(path, args.set, f"; it is run {args.doc}'s own config: restore it from a copy, or "
                                               f"pass --config FILE with the run's settings")
        if args.mode in SAMPLE_MODES and not args.set:
            return None  # a run folder without config.yml (made by hand): the checkpoint's config
        raise ConfigError(f"run {args.doc} has no {path}: train it first, or pass --config")
    return load_config(args.config or "config.yml", args.set)


def write_traceback(args, argv):
    """Append the traceback of the exception being handled to the run's log (<run>/logs/DOC/stdout.txt) when the
    run folder exists, else to a file of its own in the temporary folder; returns that file's path."""
    import tempfile
    import traceback
    folder = os.path.join(args.run, "logs", args.doc) if args.doc else None
    if folder and os.path.isdir(folder):
        path = os.path.join(folder, "stdout.txt")
    else:
        path = os.path.join(tempfile.gettempdir(), f"ncsn_traceback_{os.getpid()}.txt")
    try:
        with open(path, "a") as f:
            f.write(f"ERROR {datetime.datetime.now():%Y-%m-%d %H:%M:%S} - main.py {' '.join(argv)} failed:\n")
            f.write(traceback.format_exc())
    except OSError:
        return "nowhere: it could not be written (run with --verbose debug to see it)"
    return path


def resume_command(args):
    """The command that continues this run, as the user can paste it (messages of training say it)."""
    import shlex
    words = ["python", "main.py"] + (["--run", args.run] if args.run != "run" else []) + ["--doc", args.doc]
    words += (["--device", args.device] if args.device != "auto" else []) + (["--deterministic"] if args.deterministic
                                                                            else [])
    return shlex.join(words + ["--resume_training"])


def describe(args):
    """This command's flags in one line, key=value each: what the run's stdout.txt records of it."""
    return " ".join(f"{k}={v}" for k, v in vars(args).items())


def show_config(args):
    """--show_config: print the resolved config, defaults included (no torch needed); exit status 2 for a bad one."""
    try:
        config = resolve_config(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    import yaml
    sys.stdout.write(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return 0


def start(args, distributed):
    """The device of this command, with the process group of torchrun set up when `distributed` (rank 0 speaks for
    the run) and --deterministic applied; logged in one line."""
    import torch
    import devices

    device = devices.resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")) if distributed else None)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
        if torch.distributed.get_rank() != 0:
            log.setLevel(max(log.level, logging.WARNING))  # rank 0 speaks for the run
    log.info("device %s (--device %s), torch %s, seed %d%s%s", device, args.device, torch.__version__, args.seed,
             f", {torch.distributed.get_world_size()} processes" if distributed else "",
             f", comment: {args.comment}" if args.comment else "")
    devices.set_deterministic(args.deterministic)
    return device


def run_command(args, config, device):
    """Hand the command to its module with the values it needs (the run, the seed, the checkpoint file, the output
    folder); returns its exit status. No module below this one sees the flags."""
    from common import chosen_checkpoint
    from rundir import Run, StopSignals, output_folder

    if args.noise_design:
        import noise
        return noise.noise_design(config)
    run = Run.from_distributed(args.run, args.doc)
    if args.import_authors:
        import authors
        return authors.import_authors(args.import_authors, run, args.seed)
    ckpt_path = chosen_checkpoint(run, args.ckpt) if args.mode in SAMPLE_MODES else None
    if args.inpaint:
        import inpaint
        return inpaint.inpaint(config, device, args.inpaint, args.seed, ckpt_path,
                               output_folder(run, args.image_folder, args.ckpt, kind="inpaint"), args.overwrite)
    if args.eval:
        import evaluate
        return evaluate.evaluate(config, run, device, args.seed, ckpt_path)
    import runner
    if args.sample:
        guide = None
        if args.digit is not None:
            import guidance
            guide = guidance.digit_guide(args.digit, args.guidance_scale, device)
        return runner.sample(config, run, device, args.seed, ckpt_path,
                             output_folder(run, args.image_folder, args.ckpt, args.digit), args.overwrite, guide)
    hook = None
    if config.eval.every_snapshots:
        import evaluate
        hook = evaluate.TrainingMetrics(config)
    return runner.train(config, run, device, args.seed, args.resume_training, hook, resume_command(args),
                        describe(args), signals=StopSignals())  # the command line's Ctrl-C: stop with a checkpoint


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setup_logging(args.verbose, args.progress)
    if args.show_config:  # no torch needed
        return show_config(args)
    import torch  # imported here so that `--help` and config errors answer at once
    from common import Interrupted, NCSNError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun with several processes
    try:
        config = resolve_config(args)
        if args.set:
            log.info("--set %s", " ".join(args.set))
        if args.verify:
            import checkpoint
            from rundir import Run
            return checkpoint.verify_run(Run(args.run, args.doc))
        status = run_command(args, config, start(args, distributed))
        if distributed:
            # every rank waits here until rank 0 has written its files: a rank that went on to tear down its
            # process group alone was seen to abort (gloo, 1 launch in ~30 on a loaded CPU), and torchrun then
            # killed rank 0 before it wrote; a rank that failed raised above and never reaches this barrier
            torch.distributed.barrier()
        return status
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except Interrupted as e:
        log.warning("%s", e)
        return 128 + e.signum
    except NCSNError as e:
        log.debug("traceback:", exc_info=True)
        log.error("%s", e)
        return 1
    except Exception as e:  # anything unforeseen: one line here, the traceback in the run's log, non-zero exit
        log.debug("traceback:", exc_info=True)
        where = write_traceback(args, argv)
        log.error("%s: %s (the traceback is in %s)", type(e).__name__, str(e).strip().split("\n")[0], where)
        return 1
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
