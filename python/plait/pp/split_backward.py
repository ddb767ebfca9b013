"""Split a stage's backward in two: I (the input gradient, now) and W (weight gradients, later).

Zero-bubble schedules send the input gradient upstream as soon as possible and fill
idle time with the weight gradients. Both halves must cost what they cost inside one
backward, so W must not redo I's work. The autograd graph from the stage output is cut
at its *split nodes*: nodes on a path to the stage input that also feed a parameter
through nodes that are not (for ``nn.Linear``, its ``AddmmBackward0``)::

    output -> ... -> AddmmBackward0 -> ... -> stage input        I runs this chain only;
                         \\-> TBackward0 -> weight                 W runs these branches

I runs ``autograd.grad(output, stage_input)``, which executes only the input path and
skips the weight matmuls, and captures the gradient entering each split node. W then
runs ``autograd.backward(..., inputs=params)`` from those captured gradients, one call per
group of split nodes sharing parameters, so it computes the weight branches only and
autograd accumulates ``.grad`` (parameter hooks fire as usual). The same method is used by
``torch.distributed.pipelining``; here the graph is walked once.

Notes: a stage whose input needs no gradient (the first stage) does all of its backward
in W. Parameters reached through one custom ``autograd.Function`` that computes input
and weight gradients together get correct gradients but that node runs in both halves.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class WeightWork:
    """What W has to do for one (stage, microbatch); built by :func:`backward_input`."""

    groups: list[tuple[list, list[torch.nn.Parameter]]] = field(default_factory=list)  # (split nodes, params)
    captured: dict = field(default_factory=dict)  # split node -> gradients entering it
    full: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # (output, grad): all of it in W
    keep: Optional[torch.Tensor] = None  # the output, so the graph lives until W

    def clear(self) -> None:
        self.groups, self.captured, self.full, self.keep = [], {}, None, None


def _walk(root) -> tuple[list, dict]:
    """Nodes reachable from ``root`` (BFS order) and each node's parents."""
    order, seen, parents = [root], {root}, {}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                order.append(child)
                queue.append(child)
    return order, parents


def _ancestors(start, parents: dict) -> set:
    found, queue = {start}, deque([start])
    while queue:
        for parent in parents.get(queue.popleft(), ()):
            if parent not in found:
                found.add(parent)
                queue.append(parent)
    return found


def _params_below(node, on_input_path: set, param_of: dict) -> set:
    """Parameters reachable from ``node`` through children off the input path."""
    found, seen = set(), set()
    queue = deque(child for child, _ in node.next_functions if child is not None and child not in on_input_path)
    while queue:
        current = queue.popleft()
        if current in seen:
            continue
        seen.add(current)
        if current in param_of:
            found.add(current)
        queue.extend(child for child, _ in current.next_functions if child is not None)
    return found


def backward_input(output: torch.Tensor, grad_output: Optional[torch.Tensor], stage_input: Optional[torch.Tensor],
                   params: list[torch.nn.Parameter]) -> tuple[Optional[torch.Tensor], WeightWork]:
    """Run I: return the gradient of ``stage_input`` (None if it needs none) and W's work.

    ``output`` is the stage output (or the scaled loss on the last stage, with
    ``grad_output`` None). Parameter gradients are left for :func:`backward_weight`.
    """
    work = WeightWork(keep=output)
    if output.grad_fn is None:
        return _leaf_output(output, grad_output, stage_input, work), work
    if stage_input is None or not stage_input.requires_grad:
        work.full = (output, grad_output)
        return None, work
    input_node = get_gradient_edge(stage_input).node
    order, parents = _walk(output.grad_fn)
    if input_node not in parents:  # the output does not depend on the input
        work.full = (output, grad_output)
        return torch.zeros_like(stage_input), work
    on_path = _ancestors(input_node, parents)
    param_of = {}
    for p in params:
        if p.requires_grad:
            param_of[get_gradient_edge(p).node] = p
    below = {node: _params_below(node, on_path, param_of) for node in order if node in on_path}
    split = [node for node in order if below.get(node)]
    work.groups = _group(split, below, param_of)
    handles = [node.register_prehook(_capture(work.captured, node)) for node in split]
    try:
        (grad_input,) = torch.autograd.grad([output], [stage_input], None if grad_output is None else [grad_output],
                                            retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    return grad_input, work


def _leaf_output(output: torch.Tensor, grad_output: Optional[torch.Tensor], stage_input: Optional[torch.Tensor],
                 work: WeightWork) -> Optional[torch.Tensor]:
    """I for an output without a graph: the stage returned its input itself (a pass-through
    stage: the input gradient is the output gradient), a leaf such as a parameter (W
    accumulates into it) or a constant (no gradient at all)."""
    if stage_input is not None and output is stage_input:
        return torch.ones_like(output) if grad_output is None else grad_output
    if output.requires_grad:
        work.full = (output, grad_output)
    return None if stage_input is None else torch.zeros_like(stage_input)


def _capture(store: dict, node):
    def hook(grad_outputs):
        store[node] = grad_outputs
    return hook


def _group(split: list, below: dict, param_of: dict) -> list[tuple[list, list]]:
    """Split nodes that share a parameter go together (one autograd call each group)."""
    groups: list[tuple[list, set]] = []
    for node in split:
        merged_nodes, merged_params = [node], set(below[node])
        rest = []
        for nodes, params in groups:
            if params & merged_params:
                merged_nodes, merged_params = nodes + merged_nodes, params | merged_params
            else:
                rest.append((nodes, params))
        groups = rest + [(merged_nodes, merged_params)]
    return [(nodes, [param_of[n] for n in param_of if n in params]) for nodes, params in groups]


def backward_weight(work: WeightWork) -> None:
    """Run W: accumulate the parameter gradients into ``.grad`` (hooks fire); then release the graph."""
    try:
        if work.full is not None:
            output, grad = work.full
            torch.autograd.backward(output, grad)
            return
        for nodes, params in work.groups:
            roots, grads = [], []
            for node in nodes:
                for i, grad in enumerate(work.captured.get(node, ())):
                    if grad is not None:
                        roots.append(GradientEdge(node, i))
                        grads.append(grad)
            if not roots:
                continue
            # A split node below another one of the group would get a gradient twice
            # (once recomputed through the upper one): pin it to the captured value.
            pins = ([node.register_prehook(lambda _, saved=work.captured.get(node): saved) for node in nodes]
                    if len(nodes) > 1 else [])
            try:
                # backward(inputs=params), not grad(): .grad is accumulated by autograd itself, so
                # post-accumulate-grad hooks (data-parallel reducers) fire as after a full backward.
                torch.autograd.backward(roots, grads, retain_graph=True, inputs=params)
            finally:
                for pin in pins:
                    pin.remove()
    finally:
        work.clear()
