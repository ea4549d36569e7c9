"""What a long job tells its user: the logger's set-up, and progress as a tqdm bar on a terminal or as log lines
in a log file (nohup, a cluster's job log).

Its own module so that main.py, runner.py, guidance.py and metrics.py can share it without importing each other.
"""
import logging
import sys
import time

log = logging.getLogger("ncsn")
PROGRESS_SECONDS = 60.0  # off a terminal, a progress line at least this often (main.py --progress)
LONG_JOB_SECONDS = 600.0  # a job whose first rate says it will take longer than this gets one line saying so
LOG_FORMAT = "%(levelname)s %(asctime)s - %(message)s"
_every = {"seconds": PROGRESS_SECONDS}  # set once by setup_logging (runtime, not config)


def setup_logging(level="info", progress_seconds=PROGRESS_SECONDS):
    """The 'ncsn' logger on stderr at `level`; progress lines off a terminal every `progress_seconds`."""
    logger = logging.getLogger("ncsn")
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    for h in list(logger.handlers):  # a second call in one process (tests) starts afresh
        logger.removeHandler(h)
        h.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logger.addHandler(handler)
    _every["seconds"] = float(progress_seconds)
    return logger


def duration(seconds):
    """1 h 05 min, 7 min 55 s, 42 s."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


class Progress:
    """Progress of one job of `total` units (steps, network evaluations, batches): a tqdm bar when stderr is a
    terminal, else a log line at least every PROGRESS_SECONDS with the count, the total, the rate and the time
    left. A job that will take longer than LONG_JOB_SECONDS at the rate of its first units after the first update
    (the first one may carry start-up costs such as compiling) says so once; `budget_s` is a time limit that stops
    the job earlier (training.max_minutes).

        with Progress(total, "sample", "steps", on="cpu") as p:
            for ...: p.update(1)
    """

    def __init__(self, total, desc, unit="steps", initial=0, on=None, enabled=True, postfix=None, budget_s=None):
        self.total, self.desc, self.unit, self.n, self.on = total, desc, unit, initial, on
        self.enabled, self.start_n, self.budget_s = enabled, initial, budget_s
        self.t0 = self.last = time.time()
        self.first = None  # (time, count) at the first update: the rate that sizes the job is measured from there
        self.warned = False
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = None
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit)
        self.postfix = postfix or ""

    def rate(self):
        elapsed = time.time() - self.t0
        return (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0

    def update(self, k=1, postfix=None):
        """k more units done; `postfix` (e.g. 'loss 41.2') goes on the bar and the line."""
        if not self.enabled:
            return
        self.n += k
        if postfix is not None:
            self.postfix = postfix
        now, rate = time.time(), self.rate()
        if self.first is None:
            self.first = (now, self.n)
        elif not self.warned and now > self.first[0]:
            self.warned = True
            early = (self.n - self.first[1]) / (now - self.first[0])  # units/s after the first update
            left = (self.total - self.n) / early + (now - self.t0)
            if left > LONG_JOB_SECONDS:
                log.info("%s: %d %s will take about %s%s at the first rate (%.3g %s/s)%s; Ctrl-C stops it",
                         self.desc, self.total - self.start_n, self.unit, duration(left),
                         f" on {self.on}" if self.on else "", early, self.unit,
                         f", the time budget after {duration(self.budget_s)}" if self.budget_s and
                         self.budget_s < left else "")
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(k)
        elif now - self.last >= _every["seconds"] or self.n >= self.total:
            self.last = now
            left = (self.total - self.n) / rate if rate > 0 else float("nan")
            log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, %s left%s", self.desc, self.n, self.total, self.unit,
                     100 * self.n / max(1, self.total), rate, self.unit,
                     duration(left) if left == left else "?", f", {self.postfix}" if self.postfix else "")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
