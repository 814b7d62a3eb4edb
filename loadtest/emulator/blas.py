"""Import first (before numpy) in emulator entry points: single-threaded BLAS.

Measured on the 2-core dev box (`[32, 64] @ [64, 6144]` float32, the token-hash router's
per-chunk matmul): 9.2 ms with OpenBLAS's default thread pool versus 1.4 ms with one thread,
because the pool's threads fight the event loop and each other for two cores. Every emulated
worker shares one process, so BLAS-level parallelism buys nothing here. Has no effect once numpy
is already imported (in-process tests), and respects a value the operator set.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
