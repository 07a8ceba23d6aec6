import os
import signal

import pytest
import torch

# Every rank and server a test starts talks on loopback only.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Keeps a local Ray on 127.0.0.1 (Ray reads it at import time).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A suite started in the background of a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every driver a test starts: the Ctrl-C tests would then see a
# driver that rightly ignores Ctrl-C. Tests get the interactive default, whoever started them
# (a handler set here is the default again in each child after exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    # The reliability table is made from one session's results (tests/reliability.py).
    # Under `make test` (tests/suite.py, several pytest processes) the runner clears it once.
    from tests.reliability import RESULTS

    if os.environ.get("GAD_TEST_SUITE") != "1" and RESULTS.exists():
        RESULTS.unlink()
