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
SHORT_SHARE = 0.9  # a deadline that stops a job before this share of its total is said as a warning
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


class EarlyLog:
    """Within `with EarlyLog() as early:`, the 'ncsn' logger's records are held until early.attach(path) opens the
    run's log file: it then begins with everything the command said before its run folder existed (the resume, the
    precision, the speed path), and logs there from then on. Records not attached by the end are dropped (other
    ranks, a command that failed before its folder)."""

    def __enter__(self):
        import logging.handlers
        self.held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        log.addHandler(self.held)
        return self

    def attach(self, path):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.held.setTarget(handler)
        self.held.flush()
        log.removeHandler(self.held)
        log.addHandler(handler)

    def __exit__(self, *exc):
        log.removeHandler(self.held)
        self.held.buffer.clear()


def duration(seconds):
    """1 h 05 min, 7 min 55 s, 42 s."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


class Progress:
    """Progress of one job of `total` units (steps, network evaluations, batches): a tqdm bar when stderr is a
    terminal, else log lines: one at the first unit, then one at least every PROGRESS_SECONDS, each with the count,
    the total, the rate and the time left. At the second update the job is sized at its first rate (from the first
    update on: the first unit may carry start-up costs): a job that will take longer than LONG_JOB_SECONDS says so
    once. `deadline` (a time.time() value, e.g. training.max_minutes) is a time limit that may stop the job
    earlier: the time left and the count it expects to reach are then the deadline's, said at the sizing too, with
    `short_hint` when that count falls far short of the total.

        with Progress(total, "sample", "steps", on="cpu") as p:
            for ...: p.update(1)
    """

    def __init__(self, total, desc, unit="steps", initial=0, on=None, enabled=True, postfix=None, deadline=None,
                 short_hint=""):
        self.total, self.desc, self.unit, self.n, self.on = total, desc, unit, initial, on
        self.enabled, self.start_n, self.deadline, self.short_hint = enabled, initial, deadline, short_hint
        self.t0 = time.time()
        self.last = None  # when the last progress line was written; None: none yet
        self.first = None  # (time, count) at the first update: the rate that sizes the job is measured from there
        self.sized = False
        self.terminal = enabled and sys.stderr.isatty()
        self.bar = None
        if self.terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit)
        self.postfix = postfix or ""

    def rate(self):
        elapsed = time.time() - self.t0
        return (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0

    def note(self, postfix):
        """Show `postfix` (e.g. 'loss 41.2') from the next line or bar refresh on, without counting a unit."""
        self.postfix = postfix
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)

    def update(self, k=1, postfix=None):
        """k more units done; `postfix` as in note()."""
        if not self.enabled:
            return
        self.n += k
        if postfix is not None:
            self.note(postfix)
        now = time.time()
        if self.first is None:
            self.first = (now, self.n)
        elif not self.sized and now > self.first[0]:
            self.sized = True
            self.size((self.n - self.first[1]) / (now - self.first[0]), now)  # units/s after the first update
        if self.bar is not None:
            self.bar.update(k)
        elif self.last is None or now - self.last >= _every["seconds"] or self.n >= self.total:
            self.last = now
            self.line(now)

    def expected(self, rate, now):
        """(seconds left, the count reached when the job ends at `rate`): at the total, or at the deadline."""
        left = (self.total - self.n) / rate if rate > 0 else float("inf")
        if self.deadline is not None and now + left > self.deadline:
            return max(0.0, self.deadline - now), min(self.total, self.n + int(rate * max(0.0, self.deadline - now)))
        return left, self.total

    def size(self, early, now):
        """The one-time lines at the first rate `early`: a long job, and where a deadline will stop it."""
        whole = (self.total - self.n) / early + (now - self.t0)  # the job's length at that rate
        left, reach = self.expected(early, now)
        on = f" on {self.on}" if self.on else ""
        if whole > LONG_JOB_SECONDS:
            log.info("%s: %d %s will take about %s%s at the first rate (%.3g %s/s)%s; Ctrl-C stops it", self.desc,
                     self.total - self.start_n, self.unit, duration(whole), on, early, self.unit,
                     f", the time budget stops it in {duration(left)}" if reach < self.total else "")
        if reach < self.total:
            short = reach < SHORT_SHARE * self.total
            log.log(logging.WARNING if short else logging.INFO,
                    "%s: at the first rate (%.3g %s/s%s) the time budget ends near %s %s of %s in %s%s", self.desc,
                    early, self.unit, on, self.unit[:-1] if self.unit.endswith("s") else self.unit, f"{reach:,}",
                    f"{self.total:,}", duration(left), f": {self.short_hint}" if short and self.short_hint else "")

    def line(self, now):
        rate = self.rate()
        left, reach = self.expected(rate, now) if rate > 0 else (float("nan"), self.total)
        log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, %s left%s%s", self.desc, self.n, self.total, self.unit,
                 100 * self.n / max(1, self.total), rate, self.unit, duration(left) if left == left else "?",
                 f" (time budget; ends near {reach:,})" if reach < self.total else "",
                 f", {self.postfix}" if self.postfix else "")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
