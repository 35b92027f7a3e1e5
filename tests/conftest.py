"""Under pytest-xdist (the test line's -n auto) every core runs a worker: each worker, and each
process a test starts, computes on one thread. Two threads each would have OpenMP's spinning threads
of several workers contend for the same cores, which made in-process tests 10x slower."""
import os

import torch

if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
