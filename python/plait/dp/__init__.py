"""plait.dp: data parallelism. Gradients reduced in buckets, overlapped with backward."""
from .buckets import Bucket, build_buckets
from .grads import GradReducer

__all__ = ["GradReducer", "Bucket", "build_buckets"]
