"""The pipeline's stages, one module each, run from the project root as `python -m stages.<name>`
(dvc.yaml lists them with exactly the files each one reads)."""
import os

# One BLAS thread per process, set before any stage imports NumPy: the recurrent products are too
# small to gain from a second thread, more cores come from worker processes (train.workers), and
# spinning BLAS threads slow down experiments run side by side (`dvc queue start -j 2`).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
