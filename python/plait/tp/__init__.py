"""plait.tp: tensor parallelism. Layers, region mappings, vocab-parallel pieces.

See :mod:`plait.tp.layers` for shapes and :mod:`plait.tp.mappings` for the
autograd region functions.
"""
from .activations import ACTIVATIONS
from .layers import ColumnParallelLinear, RowParallelLinear
from .mappings import (copy_to_tp_region, gather_from_sequence_region, gather_from_tp_region,
                       reduce_from_tp_region, reduce_scatter_to_sequence_region, scatter_to_sequence_region,
                       scatter_to_tp_region)
from .vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy

__all__ = ["ACTIVATIONS", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "vocab_parallel_cross_entropy", "copy_to_tp_region", "reduce_from_tp_region",
           "scatter_to_tp_region", "gather_from_tp_region", "scatter_to_sequence_region",
           "gather_from_sequence_region", "reduce_scatter_to_sequence_region"]
