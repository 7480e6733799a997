"""Test-wide settings.

One torch thread per test process: the suite also runs Flower SuperNodes and simulation workers
as separate processes, and on a 2-core machine oversubscribed intra-op threads made the same
test ten times slower (42 s with one thread vs 394 s with two under load).
"""

import torch

torch.set_num_threads(1)
