"""Test-wide settings.

One torch thread per test process: the suite also runs Flower SuperNodes and simulation workers
as separate processes, and on a 2-core machine oversubscribed intra-op threads made the same
test ten times slower (42 s with one thread vs 394 s with two under load).
"""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _audit_state_dir(tmp_path_factory):
    """Commands append to the site's audit log; tests keep it out of the user's ~/.fedeid.

    Set in ``os.environ`` (not monkeypatch, which is per test) so CLI subprocesses and Flower
    workers started by tests inherit it.
    """
    os.environ["FEDEID_STATE_DIR"] = str(tmp_path_factory.mktemp("fedeid-state"))
