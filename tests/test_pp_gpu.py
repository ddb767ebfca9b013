"""PipelineEngine on CUDA tensors against the one-process model on the same GPU.

One GPU: a one-rank pipeline (NCCL) holding two stages per rank, which exercises the
engine's CUDA paths (buffers, stage hand-offs, CUDA-event timeline, memory counts).
Two or more GPUs: two ranks over NCCL P2P, one GPU each (NCCL refuses two ranks on one GPU).
"""
import pytest
import torch

from plait.launch import run_ranks
from pp_reference import cuda_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]


def test_engine_on_one_gpu():
    assert run_ranks(cuda_cases, 1, timeout=300)[0] > 20


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL P2P between ranks needs two GPUs")
def test_engine_over_nccl_on_two_gpus():
    assert min(run_ranks(cuda_cases, 2, timeout=300)) > 20
