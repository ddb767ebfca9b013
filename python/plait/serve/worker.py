"""What every rank of a replica does: receive the step message, run its stage, pass on hidden states,
and (on one rank) choose the tokens that every rank then receives.

==================  ==============================================================
who                 does
==================  ==============================================================
every rank          runs its pipeline stage on the step (TP collectives inside)
pipeline rank p     receives hidden states from p-1, sends its own to p+1
last stage          gathers the vocab-parallel logits over TP
sampler             the first TP rank of the last stage: picks one token per row
every rank          receives those tokens (a broadcast from the sampler)
==================  ==============================================================

Decode sends a few kilobytes per all-reduce, so the TP layers are moved to the ``auto``
communicator (plait's shared-memory backend on one CPU host) unless ``tp_backend="torch"``;
the model is then for inference only. Step messages go over the world group with the same
backend; a waiting rank spins briefly, then sleeps on a futex, so an idle rank costs no core.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import Communicator
from .batch import HEADER, IDLE, STEP, STOP, StepBatch, payload_size
from .forward import StageRunner
from .kv_cache import KVCache
from .sampling import sample


def sliding_window(model_config) -> Optional[int]:
    """The attention window of a model config, None when attention is global."""
    window = getattr(model_config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(model_config, "use_sliding_window", True):
        return window
    return None


def local_kv_heads(model) -> int:
    """KV heads of this TP rank, as the parallel model's projections hold them."""
    from ..parallel.apply import heads_for

    if model.plan.family == "gpt2":
        return model.dims.num_heads // model.mesh.tp
    return len(heads_for(model.dims, model.mesh.tp, model.mesh.tp_rank).kv_heads)


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
    """This rank's part of a replica: its stage, its KV cache, and the step protocol (see module docstring)."""

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
        stage = model.stages[0]
        self.dtype = model.dtype
        self.cache = KVCache(len(stage.layer_paths), max_batch, local_kv_heads(model), max_len,
                             model.dims.head_dim, self.dtype, self.mesh.device)
        self.tp_comm = self.mesh.tp_comm
        if tp_backend != "torch" and self.mesh.tp > 1:      # collective over the TP group
            self.tp_comm = Communicator.create(tp_backend, self.mesh.tp_group, name="tp")
            use_comm(stage, self.mesh.tp_comm, self.tp_comm)
        self.runner = StageRunner(stage, model.plan.family, self.cache, sliding_window(model.model_config))
        # Step messages: a few int64s every step, so the same backend as the TP layers (shm on one CPU host,
        # about 20 us a broadcast against gloo's 1-2 ms); its idle waiters sleep on a futex.
        messages = "torch" if tp_backend == "torch" or self.mesh.world_size == 1 else tp_backend
        self.world = Communicator.create(messages, None, name="serve")
        self.sampler = self.mesh.rank_of(self.mesh.dp_rank, self.mesh.pp - 1, 0)
        self.leader = self.mesh.rank_of(self.mesh.dp_rank, 0, 0)
        self.received: Optional[list[list[int]]] = [] if record else None
        self.max_batch, self.max_len = max_batch, max_len

    # ----------------------------------------------------------------- messages
    def send_control(self, op: int) -> None:
        """Leader only: tell every rank to idle or stop."""
        self.world.broadcast(torch.tensor([op, 0, 0], dtype=torch.int64), src=self.leader)

    def step(self, batch: StepBatch) -> list[int]:
        """Leader only: send ``batch`` to every rank, run it, and return the chosen tokens."""
        self.world.broadcast(batch.header(), src=self.leader)
        self.world.broadcast(batch.payload(), src=self.leader)
        return self._run(batch)

    def follow(self) -> None:
        """Every rank but the leader: run the steps the leader sends until it says stop."""
        while True:
            header = torch.empty(HEADER, dtype=torch.int64)
            self.world.broadcast(header, src=self.leader)
            op, batch, seq = header.tolist()
            if op == STOP:
                return
            if op == IDLE:
                continue
            if op != STEP:
                raise RuntimeError(f"rank {self.mesh.rank}: unknown step message {op}")
            payload = torch.empty(payload_size(batch, seq), dtype=torch.int64)
            self.world.broadcast(payload, src=self.leader)
            self._run(StepBatch.from_payload(payload, batch, seq))

    # ----------------------------------------------------------------- compute
    def _run(self, batch: StepBatch) -> list[int]:
        mesh = self.mesh
        if mesh.is_first_stage:
            x = batch.tokens
        else:
            x = torch.empty(*batch.tokens.shape, self.model.dims.hidden, dtype=self.dtype, device=mesh.device)
            mesh.pp_comm.recv(x, src=mesh.pp_rank - 1)
        y = self.runner(x.to(mesh.device), batch.inputs)
        if not mesh.is_last_stage:
            mesh.pp_comm.send(y, dst=mesh.pp_rank + 1)
        tokens = torch.zeros(batch.tokens.shape[0], dtype=torch.int64)
        if mesh.is_last_stage:
            logits = self.tp_comm.all_gather(y.contiguous(), dim=-1)[..., :self.model.dims.vocab_size]
            if mesh.rank == self.sampler:
                tokens = self._sample(logits.cpu(), batch)
        self.world.broadcast(tokens, src=self.sampler)
        chosen = tokens.tolist()
        if self.received is not None:
            self.received.append(chosen)
        return chosen

    @staticmethod
    def _sample(logits: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return torch.tensor([sample(logits[r], float(batch.temperature[r]), int(batch.top_k[r]),
                                    float(batch.top_p[r]), int(batch.seed[r]), int(batch.index[r]))
                             for r in range(logits.shape[0])], dtype=torch.int64)
