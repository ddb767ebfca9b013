"""Communication time: collectives on the links a process group actually uses.

Costs are the alpha-beta model (Thakur et al. 2005; Patarasuk & Yuan 2009 for the ring)
with n bytes per rank, g ranks, link bandwidth B (per GPU and direction, times
``HardwareSpec.link_efficiency``) and per-step latency a:

    ring all-reduce          2 (g-1)/g * n/B + 2 (g-1) a
    tree all-reduce          2 n/B + 2 ceil(log2 g) a        (NCCL's double binary tree)
    all-gather / reduce-scatter   (g-1)/g * n/B + (g-1) a    (n: the full, gathered size)

An all-reduce takes the cheaper of ring and tree. A group that spans nodes is reduced
hierarchically: reduce-scatter inside each node over NVLink, all-reduce of the 1/l shard
across the k nodes (each GPU on its own NIC), all-gather inside the node.

Placement follows ``plait.mesh``: ranks are ordered (dp, pp, tp) with tp innermost, so a
TP group is g consecutive ranks, a pipeline neighbour is tp ranks away and a DP group
has stride pp*tp.
"""
from __future__ import annotations

import math

from .config import HardwareSpec


def _bandwidth(cluster: HardwareSpec, inter: bool) -> float:
    gbs = cluster.inter_node_gbs if inter else cluster.intra_node_gbs
    return gbs * 1e9 * cluster.link_efficiency


def _latency(cluster: HardwareSpec, inter: bool) -> float:
    return cluster.inter_node_latency_s if inter else cluster.intra_node_latency_s


def flat_allreduce(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for an all-reduce over one kind of link: the cheaper of ring and tree."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    ring = 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency
    tree = 2 * nbytes / bandwidth + 2 * math.ceil(math.log2(ranks)) * latency
    return min(ring, tree)


def flat_allgather(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for an all-gather (or reduce-scatter) whose gathered size is `nbytes`."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return (ranks - 1) / ranks * nbytes / bandwidth + (ranks - 1) * latency


def group_placement(cluster: HardwareSpec, size: int, stride: int) -> tuple[int, int]:
    """(members per node, nodes spanned) of a group of `size` ranks `stride` apart."""
    per_node = 1 if stride >= cluster.gpus_per_node else max(1, min(size, cluster.gpus_per_node // stride))
    return per_node, math.ceil(size / per_node)


def allreduce_time(cluster: HardwareSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """Seconds to all-reduce `nbytes` per rank over a group laid out with `stride`."""
    local, nodes = group_placement(cluster, size, stride)
    if nodes == 1:
        return flat_allreduce(nbytes, size, _bandwidth(cluster, False), _latency(cluster, False))
    intra = 2 * flat_allgather(nbytes, local, _bandwidth(cluster, False), _latency(cluster, False))
    return intra + flat_allreduce(nbytes / local, nodes, _bandwidth(cluster, True), _latency(cluster, True))


def allgather_time(cluster: HardwareSpec, nbytes: float, size: int, stride: int = 1) -> float:
    """Seconds to all-gather (or reduce-scatter) a tensor of `nbytes` gathered size."""
    local, nodes = group_placement(cluster, size, stride)
    if nodes == 1:
        return flat_allgather(nbytes, size, _bandwidth(cluster, False), _latency(cluster, False))
    intra = flat_allgather(nbytes, local, _bandwidth(cluster, False), _latency(cluster, False))
    return intra + flat_allgather(nbytes / local, nodes, _bandwidth(cluster, True), _latency(cluster, True))


def tp_layer_comm(cluster: HardwareSpec, tokens: int, hidden: int, tp: int, sp: bool) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's TP collectives, before overlap.

    Without SP: two all-reduces of the [tokens, hidden] activation forward (after attention
    and after the MLP) and two backward (the column-parallel input gradients). With SP the
    all-reduces become all-gather + reduce-scatter pairs of the same volume, and backward
    all-gathers the sequence-sharded inputs again for the weight gradients (Korthikanti et
    al. 2022, sec. 4.2.2).
    """
    if tp == 1:
        return 0.0, 0.0
    nbytes = 2.0 * tokens * hidden
    if not sp:
        one = allreduce_time(cluster, nbytes, tp)
        return 2 * one, 2 * one
    gather = allgather_time(cluster, nbytes, tp)
    return 4 * gather, 6 * gather


def p2p_time(cluster: HardwareSpec, tokens: int, hidden: int, tp: int, pp: int) -> float:
    """Seconds to send one microbatch's activation (or its gradient) to the next stage.

    Each TP rank sends its 1/tp share (Megatron-LM's scatter/gather optimisation, or the
    sequence shard under SP) on its own link; the slowest boundary paces the pipeline, so
    the inter-node link counts as soon as any boundary crosses nodes.
    """
    if pp == 1:
        return 0.0
    inter = pp * tp > cluster.gpus_per_node
    return _latency(cluster, inter) + 2.0 * tokens * hidden / tp / _bandwidth(cluster, inter)


def dp_grad_reduction(cluster: HardwareSpec, grad_bytes: float, dp: int, stride: int) -> float:
    """Seconds to reduce the gradients over the DP group (all-reduce, or ZeRO's reduce-scatter
    plus the parameter all-gather after the step: the same volume)."""
    return allreduce_time(cluster, grad_bytes, dp, stride)
