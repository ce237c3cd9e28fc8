"""Test session set-up: datasets live in a throw-away root, so the suite never writes into a
user's $OPENSEG_DATASETS or the checkout, and the demo data is generated fresh."""
import os
import shutil
import tempfile

import torch

DATASETS_ROOT = tempfile.mkdtemp(prefix="openseg-test-datasets-")
os.environ["OPENSEG_DATASETS"] = DATASETS_ROOT
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATASETS_ROOT, ignore_errors=True)
