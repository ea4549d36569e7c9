"""Runs main.py with metrics.train_classifier reporting each time it runs, and on which rank, so that a test can
count how many processes of a torchrun job trained the digit classifier.

    torchrun --nproc_per_node=2 -- tests/classifier_driver.py MAIN_ARGS...
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import metrics  # noqa: E402

_train = metrics.train_classifier


def reporting_train(*args, **kwargs):
    print(f"digit classifier trained on rank {os.environ.get('RANK', '0')}", file=sys.stderr, flush=True)
    return _train(*args, **kwargs)


metrics.train_classifier = reporting_train

import main  # noqa: E402

sys.exit(main.main(sys.argv[1:]))
