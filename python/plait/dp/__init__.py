"""plait.dp: data parallelism. Gradients reduced in buckets, overlapped with backward;
optionally ZeRO-1 (optimizer state sharded over DP, :class:`ShardedOptimizer`)."""
from .buckets import Bucket, build_buckets
from .clip import clip_grad_norm_
from .grads import GradReducer
from .shards import Piece
from .zero import ELEMENTWISE, ShardedOptimizer, optimizer_state_bytes

__all__ = ["GradReducer", "Bucket", "build_buckets", "ShardedOptimizer", "ELEMENTWISE", "optimizer_state_bytes",
           "clip_grad_norm_", "Piece"]
