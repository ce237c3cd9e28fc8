"""Test session set-up: datasets live in a throw-away root, so the suite never writes into a
user's $OPENSEG_DATASETS or the checkout, and the demo data is generated fresh."""
import os
import tempfile

import torch

os.environ["OPENSEG_DATASETS"] = tempfile.mkdtemp(prefix="openseg-test-datasets-")
torch.set_num_threads(min(2, os.cpu_count() or 1))
