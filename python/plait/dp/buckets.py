"""Gradient buckets: parameters' gradients as views into a few flat buffers.

Parameters are taken in reverse registration order, which approximates the
order in which backward produces their gradients, so the first bucket fills
first and its reduction can start while backward continues. A bucket holds
one dtype and one device and closes once it reaches ``bucket_bytes``.

With ``pad_to=n`` each buffer is zero-padded to a multiple of ``n`` elements,
so it splits into ``n`` equal shards (ZeRO-1 reduce-scatters it over DP); the
padding is nobody's gradient and stays zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Bucket:
    """A flat gradient buffer and the parameters whose ``.grad`` are views into it."""

    index: int
    buffer: torch.Tensor
    params: list[torch.nn.Parameter] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0  # elements that belong to parameters; the rest of ``buffer`` is padding

    @property
    def padding(self) -> int:
        """Zero elements at the end of the buffer, there only to make it divisible."""
        return self.buffer.numel() - self.numel

    def view_of(self, i: int) -> torch.Tensor:
        """The slice of the buffer that is parameter ``i``'s gradient, shaped like it."""
        param = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + param.numel()].view_as(param)

    def attach(self) -> None:
        """Make every parameter's ``.grad`` the view into this bucket (after zero_grad(set_to_none))."""
        for i, param in enumerate(self.params):
            view = self.view_of(i)
            if param.grad is None or param.grad.data_ptr() != view.data_ptr():
                if param.grad is not None:
                    view.copy_(param.grad)
                param.grad = view


def build_buckets(params: list[torch.nn.Parameter], bucket_bytes: int, pad_to: int = 1) -> list[Bucket]:
    """Group ``params`` (reverse order, same dtype and device) into buckets of about ``bucket_bytes``,
    each buffer padded to a multiple of ``pad_to`` elements."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
    groups: list[list[torch.nn.Parameter]] = []
    size = 0
    for param in reversed(params):
        nbytes = param.numel() * param.element_size()
        current = groups[-1] if groups else None
        fits = (current is not None and size + nbytes <= bucket_bytes and current[0].dtype == param.dtype
                and current[0].device == param.device)
        if fits:
            current.append(param)
            size += nbytes
        else:
            groups.append([param])
            size = nbytes
    buckets = []
    for index, group in enumerate(groups):
        offsets, total = [], 0
        for param in group:
            offsets.append(total)
            total += param.numel()
        padded = -(-total // pad_to) * pad_to
        buffer = torch.zeros(padded, dtype=group[0].dtype, device=group[0].device)
        bucket = Bucket(index, buffer, list(group), offsets, total)
        bucket.attach()
        buckets.append(bucket)
    return buckets
