"""plait: data, pipeline and tensor parallelism for PyTorch, braided into one library.

    import plait
    mesh = plait.init_mesh(dp=2, pp=2, tp=2)
    layer = plait.ColumnParallelLinear(1024, 4096, activation="gelu")

The compiled extension ``plait._C`` and the Triton kernels ``plait.kernels`` are
imported on demand, so the pure-Python parts work without them.
"""
from . import comm, plan, pp, tp
from .errors import CommError, CommTimeoutError, PlaitError
from .mesh import ParallelMesh, current_mesh, destroy_mesh, init_mesh
from .pp import PipelineEngine
from .tp import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, vocab_parallel_cross_entropy

__version__ = "0.1.0"

__all__ = ["init_mesh", "current_mesh", "destroy_mesh", "ParallelMesh", "ColumnParallelLinear",
           "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
           "CommError", "CommTimeoutError", "PlaitError", "comm", "plan", "pp", "tp", "PipelineEngine", "__version__"]
