"""clipdistill: distil large image-text models into small dual-encoder students."""

import os

# Intel MKL (torch's CPU BLAS) picks kernels by the buffers' memory alignment unless told not to,
# so the same matmul can differ in the last bits between two runs of one process: a resumed run
# then drifts from an uninterrupted one (seen on an AVX-512 Xeon, never on AMD). STRICT
# conditional numerical reproducibility keeps results independent of alignment. MKL reads the
# variable when it first runs, so it is set here, before any clipdistill module imports torch;
# a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
