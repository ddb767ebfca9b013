"""Tensor-parallel layers on CUDA tensors against nn.Linear on the same GPU.

One GPU: TP=1 runs on NCCL; TP=2 runs two processes sharing the GPU with gloo
carrying the CUDA tensors (NCCL refuses two ranks on one device). The CUDA
side of the chunked path (stream-ordered waits) is exercised by both.
"""
import pytest
import torch

from plait.launch import run_ranks
from tp_reference import run_layer_cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")]


def test_layers_on_cuda_tp1_nccl():
    assert run_ranks(run_layer_cases, 1, "cuda", "nccl")[0] > 40


def test_layers_on_cuda_tp2_sharing_one_gpu():
    assert run_ranks(run_layer_cases, 2, "cuda", "gloo")[0] > 40
