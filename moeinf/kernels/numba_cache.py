"""How host (Numba) kernels that call parallel ones are compiled.

A function cached with `cache=True` that calls a parallel (prange) function, compiled as a plain
(not parallel) function, can crash when a later process loads it from the cache (a segmentation
fault on its first call) once it and the parallel function were compiled by different processes:
its cached code names the parallel function's native code by a name made from the order
functions compiled in that process (numba issues 4807, 8578 and 10128, open). Reproduced here:
the kernel tests in one process, then a decode in the next, crashed in the host decode block.
Compiling the caller as a parallel function too, as issue 4807 found, keeps it cached and
loadable; CALLS_PARALLEL does so with every automatic parallelisation off, so that its own array
expressions (np.zeros, np.full) stay serial. Not caching those callers also avoids the crash,
but then each process spent 25-45 s compiling them before its first decode step.
"""

from __future__ import annotations

import warnings

from numba.core.errors import NumbaPerformanceWarning

# parallel= for functions that call a parallel function but have no prange of their own
CALLS_PARALLEL = dict(
    prange=True, comprehension=False, reduction=False, inplace_binop=False, setitem=False, numpy=False,
    stencil=False, fusion=False,
)  # fmt: skip

# Numba warns, when it compiles such a function, that it found nothing to parallelise: true, and
# meant; silenced for this package's kernels only (the message names the function's file)
warnings.filterwarnings(
    "ignore",
    message=r"(?s).*'parallel=True' was specified but no transformation.*moeinf[/\\]kernels[/\\]",
    category=NumbaPerformanceWarning,
)
