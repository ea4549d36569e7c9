"""Command line for NCSN on MNIST: flags + YAML config -> a read-only namespace -> the runner.

    python main.py --config config.yml --doc mnist               # train into run/logs/mnist
    python main.py --config config.yml --doc mnist --resume_training
    python main.py --doc mnist --sample -o samples               # annealed Langevin dynamics
    python main.py --doc mnist --sample --digit 7 --guidance_scale 5 -o sevens     # guidance.py
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

from schema import ConfigError, load_config

log = logging.getLogger("ncsn")
COLLECTIVE_TIMEOUT_MIN = 30  # how long a rank waits at a collective under torchrun (e.g. while rank 0 trains
#                              the metrics classifier) before the run fails with a timeout


def parse_device(name):
    """--device's spelling (torch is not imported yet): auto, cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Noise Conditional Score Networks (Song & Ermon, 2019) on MNIST")
    p.add_argument("--config", default=None, help="YAML config (default: config.yml; with --sample: the run's own)")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--run", default="run", help="output root: logs/<doc>, tensorboard/<doc> under it")
    p.add_argument("--doc", default="0", help="name of the run (a folder under run/logs)")
    p.add_argument("--comment", default="", help="free text recorded in the log")
    p.add_argument("--verbose", default="info", choices=["info", "debug", "warning", "critical"],
                   help="log level; 'debug' also prints tracebacks")
    p.add_argument("--device", default="auto", type=parse_device, metavar="DEVICE",
                   help="auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps; default auto")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only (bitwise repeatable on CUDA, slower; an op without one is an error)")
    p.add_argument("--resume_training", action="store_true", help="continue the run from its checkpoint.pth")
    p.add_argument("--sample", "--test", dest="sample", action="store_true",
                   help="draw samples from the run's checkpoint with annealed Langevin dynamics")
    p.add_argument("--digit", choices=[str(d) for d in range(10)] + ["all"],
                   help="with --sample: draw this digit, or one row per digit, by classifier guidance (guidance.py)")
    p.add_argument("--guidance_scale", type=float, metavar="W",
                   help="with --digit: the guidance scale w >= 0 (default: the config's sampling.guidance_scale)")
    p.add_argument("--inpaint", choices=["bottom", "right", "square", "random"],
                   help="complete MNIST test digits with this region hidden, using the run's checkpoint")
    p.add_argument("--eval", action="store_true",
                   help="FID and Inception-style score of the run's checkpoint, and its test loss per noise level")
    p.add_argument("--noise_design", action="store_true",
                   help="print the NCSNv2 noise levels and step size that the data and config call for")
    p.add_argument("--import_authors", metavar="PATH",
                   help="make run --doc from the authors' NCSN run folder run/logs/<doc> (or its checkpoint.pth)")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint of run --doc (CRC-32s, then a load): one line each, ok or what is wrong")
    p.add_argument("-o", "--image_folder", default="images", help="where --sample and --inpaint write")
    p.add_argument("--overwrite", action="store_true", help="let --sample replace outputs already in -o")
    args = p.parse_args(argv)
    if args.doc in ("", ".", "..") or "/" in args.doc or "\\" in args.doc:
        p.error(f"--doc must be a plain folder name, got {args.doc!r}")
    if args.digit is not None and not args.sample:
        p.error("--digit goes with --sample")
    if args.guidance_scale is not None and (args.digit is None or not 0 <= args.guidance_scale < float("inf")):
        p.error(f"--guidance_scale goes with --digit and must be a number >= 0, got {args.guidance_scale}")
    return args


def setup_logging(level):
    logger = logging.getLogger("ncsn")
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    for h in list(logger.handlers):  # a second call in one process (tests) starts afresh
        logger.removeHandler(h)
        h.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s - %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    return logger


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    import torch  # imported here so that `--help` and config errors answer at once
    import devices
    import runner
    from common import Interrupted, NCSNError

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun with several processes
    try:
        if args.verify:  # reads the run's checkpoint files only: no config, no device
            import checkpoint
            return checkpoint.verify_run(args)
        config = None
        if not (args.sample or args.inpaint or args.eval or args.import_authors) or args.config is not None:
            config = load_config(args.config or "config.yml")
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
        if args.import_authors:
            import authors
            return authors.import_authors(args)
        if args.noise_design:
            import noise
            return noise.noise_design(config)
        if args.inpaint:
            import inpaint
            return inpaint.inpaint(args, config, device, args.inpaint)
        if args.eval:
            import evaluate
            return evaluate.evaluate(args, config, device)
        if args.sample:
            guide = None
            if args.digit is not None:
                import guidance
                guide = guidance.digit_guide(args, device)
            return runner.sample(args, config, device, guide=guide)
        hook = None
        if config.eval.every_snapshots:
            import evaluate
            hook = evaluate.TrainingMetrics(config)
        return runner.train(args, config, device, on_snapshot=hook)
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
    except Exception as e:  # anything unforeseen: one line, traceback with --verbose debug, non-zero exit
        log.debug("traceback:", exc_info=True)
        log.error("%s: %s (run with --verbose debug for the traceback)", type(e).__name__, e)
        return 1
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
