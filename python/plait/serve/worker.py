"""What every rank of a replica does: receive the step message, run its stage, pass on hidden states,
and (on one rank) choose the tokens.

With one pipeline stage (``pp == 1``) the leader broadcasts each step over the replica's
world, every rank runs it, and the sampler broadcasts the chosen tokens back to all:

==================  ==============================================================
who                 does (pp == 1)
==================  ==============================================================
every rank          receives the step message (a broadcast from the leader)
every rank          runs the stage on the step (TP collectives inside)
sampler (= leader)  gathers the vocab-parallel logits over TP, picks one token per row
every rank          receives those tokens (a broadcast from the sampler)
==================  ==============================================================

With ``pp > 1`` the decode is **pipelined**: the leader keeps up to ``pp`` steps (groups of
requests with disjoint cache slots) in flight, so stage 0 computes one group while later
stages compute the others. No message spans the replica, since a collective over the world
would make every stage wait for the slowest again:

==================  ==============================================================
who                 does (pp > 1)
==================  ==============================================================
leader              broadcasts the step message within stage 0's TP group and posts a
                    receive for the step's tokens from the sampler
pipeline rank p     receives the message and hidden states from rank p-1 (same TP
                    rank), runs its stage, sends message and hidden states to p+1
last stage          gathers the vocab-parallel logits over TP
sampler             the first TP rank of the last stage: picks one token per row and
                    sends them to the leader (p2p), which feeds them into the group's
                    next step message; that message is how every other rank gets them
==================  ==============================================================

Control messages (IDLE, STOP) take the same path, so they reach every rank in order after
the steps before them. Every wait is bounded by ``PLAIT_TIMEOUT_S`` and fails with an error
naming rank, group and operation (:mod:`plait.comm`).

Decode sends a few kilobytes per all-reduce, so the TP layers are moved to the ``auto``
communicator (plait's shared-memory backend on one CPU host) unless ``tp_backend="torch"``;
the model is then for inference only. Without pipelining, step messages go over the world group
with the same backend (shm on one CPU host: a waiting rank spins briefly, then sleeps on a futex,
so an idle rank costs no core); pipelined replicas send them over torch (gloo).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm import Communicator
from ..comm.base import Handle
from .batch import HEADER, IDLE, STEP, STOP, StepBatch, payload_size
from .forward import StageRunner
from .kv_cache import KVCache
from .sampling import sample


def local_kv_heads(model) -> int:
    """KV heads of this TP rank, as the parallel model's projections hold them (the family knows)."""
    return model.stages[0].family.local_kv_heads(model.dims, model.mesh.tp, model.mesh.tp_rank)


def context_length(model_config) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("the model config names no context length (max_position_embeddings); pass max_len")


def use_comm(stage, old, new) -> None:
    """Point every TP module of ``stage`` that talks over ``old`` at ``new`` (e.g. shm instead of gloo)."""
    for module in stage.modules():
        if getattr(module, "comm", None) is old:
            module.comm = new


class Worker:
    """This rank's part of a replica: its stage, its KV cache, and the step protocol (see module docstring).

    With ``record=True`` it keeps ``received``, the tokens this rank was sent per step (every rank when
    ``pp == 1``; the leader and the sampler when pipelined), and ``steps``, the ``(slots, tokens)`` of every
    step message this rank ran, which is the same list on every rank of the replica.
    """

    def __init__(self, model, max_batch: int, max_len: Optional[int] = None, record: bool = False,
                 tp_backend: str = "auto") -> None:
        if len(model.stages) != 1:
            raise ValueError(f"serving needs one pipeline stage per rank (num_virtual=1), this rank has "
                             f"{len(model.stages)}")
        if model.mesh.dp != 1:
            raise ValueError(f"a serving replica is one (pp, tp) group; run dp replicas as separate worlds "
                             f"(plait serve --dp), not a mesh with dp={model.mesh.dp}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        limit = context_length(model.model_config)
        max_len = limit if max_len is None else max_len
        if not isinstance(max_len, int) or not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be an integer in [1, {limit}] (the model's context), got {max_len!r}")
        self.model, self.mesh = model, model.mesh
        model.eval()                     # serving never trains: no dropout, whatever mode the model came in
        stage = model.stages[0]
        self.dtype = model.dtype
        self.cache = KVCache(len(stage.layer_paths), max_batch, local_kv_heads(model), max_len,
                             model.dims.head_dim, self.dtype, self.mesh.device)
        self.tp_comm = self.mesh.tp_comm
        if tp_backend != "torch" and self.mesh.tp > 1:      # collective over the TP group
            self.tp_comm = Communicator.create(tp_backend, self.mesh.tp_group, name="tp")
            use_comm(stage, self.mesh.tp_comm, self.tp_comm)
        self.runner = StageRunner(stage, self.cache)
        self.pipelined = self.mesh.pp > 1
        if self.pipelined:
            self.stage_comm = Communicator.create("torch", self.mesh.tp_group, name="serve-stage")
            self.line = Communicator.create("torch", self.mesh.pp_group, name="serve-pp")
        else:
            # Step messages: a few int64s every step, so the same backend as the TP layers (shm on one CPU
            # host, about 20 us a broadcast against gloo's 1-2 ms); its idle waiters sleep on a futex.
            messages = "torch" if tp_backend == "torch" or self.mesh.world_size == 1 else tp_backend
            self.world = Communicator.create(messages, None, name="serve")
        self.sampler = self.mesh.rank_of(self.mesh.dp_rank, self.mesh.pp - 1, 0)
        self.leader = self.mesh.rank_of(self.mesh.dp_rank, 0, 0)
        self.received: Optional[list[list[int]]] = [] if record else None
        self.steps: Optional[list[tuple[list[int], list[list[int]]]]] = [] if record else None
        self.max_batch, self.max_len = max_batch, max_len

    # ----------------------------------------------------------------- leader
    def send_control(self, op: int) -> None:
        """Leader only: tell every rank to idle or stop."""
        header = torch.tensor([op, 0, 0], dtype=torch.int64)
        if not self.pipelined:
            self.world.broadcast(header, src=self.leader)
            return
        self.stage_comm.broadcast(header, src=0)
        self.line.send(header, dst=1)

    def step(self, batch: StepBatch) -> list[int]:
        """Leader only: send ``batch`` to every rank, run it, and return the chosen tokens."""
        if self.pipelined:
            return self.collect(self.launch(batch))
        self.world.broadcast(batch.header(), src=self.leader)
        self.world.broadcast(batch.payload(), src=self.leader)
        tokens = self._compute(batch)
        if tokens is None:
            tokens = torch.zeros(batch.tokens.shape[0], dtype=torch.int64)
        return self._received(self.world.broadcast(tokens, src=self.sampler))

    def launch(self, batch: StepBatch) -> Handle:
        """Leader only, pipelined: start ``batch`` down the pipeline; the handle's ``wait`` gives its tokens.

        Returns once stage 0 has run it, so the leader can launch another group while the later stages
        compute this one. The sampler answers in launch order.
        """
        header, payload = batch.header(), batch.payload()
        self.stage_comm.broadcast(header, src=0)
        self.stage_comm.broadcast(payload, src=0)
        tokens = torch.empty(batch.tokens.shape[0], dtype=torch.int64)
        handle = self.line.recv(tokens, src=self.mesh.pp - 1, async_op=True)
        self._compute(batch, header, payload)
        return handle

    def collect(self, handle: Handle) -> list[int]:
        """Leader only, pipelined: wait (bounded) for the tokens of a launched step."""
        return self._received(handle.wait())

    # ----------------------------------------------------------------- followers
    def follow(self) -> None:
        """Every rank but the leader: run the steps the leader sends until it says stop."""
        while True:
            header = self._receive(torch.empty(HEADER, dtype=torch.int64))
            op, batch, seq = header.tolist()
            if op in (STOP, IDLE):
                if self.pipelined and not self.mesh.is_last_stage:
                    self.line.send(header, dst=self.mesh.pp_rank + 1)
                if op == STOP:
                    return
                continue
            if op != STEP:
                raise RuntimeError(f"rank {self.mesh.rank}: unknown step message {op}")
            payload = self._receive(torch.empty(payload_size(batch, seq), dtype=torch.int64))
            step = StepBatch.from_payload(payload, batch, seq)
            tokens = self._compute(step, header, payload)
            if not self.pipelined:
                if tokens is None:
                    tokens = torch.zeros(batch, dtype=torch.int64)
                self._received(self.world.broadcast(tokens, src=self.sampler))
            elif tokens is not None:                       # the sampler of a pipeline
                self.line.send(tokens, dst=0)
                self._received(tokens)

    def _receive(self, buffer: torch.Tensor) -> torch.Tensor:
        """The next part of a step message: from the leader (pp == 1, or stage 0), else from stage p-1."""
        if not self.pipelined:
            return self.world.broadcast(buffer, src=self.leader)
        if self.mesh.is_first_stage:
            return self.stage_comm.broadcast(buffer, src=0)
        return self.line.recv(buffer, src=self.mesh.pp_rank - 1)

    # ----------------------------------------------------------------- compute
    def _compute(self, batch: StepBatch, header: Optional[torch.Tensor] = None,
                 payload: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Run this rank's stage on ``batch``: pass message and hidden states on (pipelined, not the last
        stage), or gather the logits (last stage). Returns the chosen tokens on the sampler, else None."""
        mesh = self.mesh
        if self.steps is not None:
            self.steps.append((batch.slots.tolist(),
                               [row[:n].tolist() for row, n in zip(batch.tokens, batch.lengths.tolist())]))
        if mesh.is_first_stage:
            x = batch.tokens
        else:
            x = torch.empty(*batch.tokens.shape, self.model.dims.hidden, dtype=self.dtype, device=mesh.device)
            self.line.recv(x, src=mesh.pp_rank - 1)
        y = self.runner(x.to(mesh.device), batch.inputs)
        if not mesh.is_last_stage:
            for part in (header, payload, y):
                self.line.send(part, dst=mesh.pp_rank + 1)
            return None
        logits = self.tp_comm.all_gather(y.contiguous(), dim=-1)[..., :self.model.dims.vocab_size]
        if mesh.rank != self.sampler:
            return None
        return self._sample(logits.cpu(), batch)

    def _received(self, tokens: torch.Tensor) -> list[int]:
        chosen = tokens.tolist()
        if self.received is not None:
            self.received.append(chosen)
        return chosen

    @staticmethod
    def _sample(logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return torch.tensor([sample(logits[r], float(batch.temperature[r]), int(batch.top_k[r]),
                                    float(batch.top_p[r]), int(batch.seed[r]), int(batch.index[r]))
                             for r in range(logits.shape[0])], dtype=torch.int64)
