"""The channels of a serving replica: control on the CPU, tensors on the device.

Step messages, control messages and the sampler's answers are small int64 CPU tensors; hidden
states and logits live on the device. As vLLM separates them, each goes over its own process
group: control over groups made for it with the gloo backend (on CPU, through plait's
shared-memory communicator where it applies), tensors over the mesh's own groups (NCCL on CUDA,
gloo on CPU). So one engine runs on both, and on CPU the control groups are still distinct groups.

=================  =================  ===========================  ==========================
channel            group              carries                      used when
=================  =================  ===========================  ==========================
``messages``       replica (gloo)     step messages, answers       pp == 1 (broadcasts)
``stage``          TP line (gloo)     step messages                pp > 1, stage 0 broadcasts
``control_line``   PP line (gloo)     step messages, answers       pp > 1 (p2p)
``hidden_line``    PP line (mesh)     hidden states                pp > 1 (p2p)
``tp``             TP line (mesh)     TP all-reduces, logits       always
=================  =================  ===========================  ==========================
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ..comm import Communicator


@dataclass
class Channels:
    messages: Optional[Communicator]
    stage: Optional[Communicator]
    control_line: Optional[Communicator]
    hidden_line: Optional[Communicator]
    groups: dict

    @classmethod
    def of(cls, mesh, tp_backend: str) -> "Channels":
        """Make this rank's channels (a collective: every rank of the replica calls it, in the same order)."""
        replica = dist.new_group(backend="gloo")
        tp_lines, _ = dist.new_subgroups_by_enumeration(mesh.axis_lines("tp"), backend="gloo")
        pp_lines, _ = dist.new_subgroups_by_enumeration(mesh.axis_lines("pp"), backend="gloo")
        groups = {"replica": replica, "tp": tp_lines, "pp": pp_lines}
        if mesh.pp > 1:
            return cls(None, Communicator.create("torch", tp_lines, name="serve-stage"),
                       Communicator.create("torch", pp_lines, name="serve-pp"),
                       Communicator.create("torch", mesh.pp_group, name="serve-hidden"), groups)
        # A few int64s every step: the TP layers' backend (shm on one CPU host, about 20 us a broadcast against
        # gloo's 1-2 ms); its idle waiters sleep on a futex.
        backend = "torch" if tp_backend == "torch" or mesh.world_size == 1 else tp_backend
        return cls(Communicator.create(backend, replica, name="serve"), None, None, None, groups)
