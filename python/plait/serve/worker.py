"""What every rank of a replica does: receive the step message, run its stage, pass on hidden states,
and (on one rank) choose the tokens.

With one pipeline stage (``pp == 1``) the leader broadcasts each step over the replica's
world, every rank runs it, and the sampler broadcasts the chosen tokens back to all:

==================  ==============================================================
who                 does (pp == 1)
==================  ==============================================================
every rank          receives the step message (a broadcast from the leader)
every rank          runs the stage on the step (TP collectives inside)
sampler (= leader)  gathers the vocab-parallel logits over TP, picks one token per row (with
                    its log-probabilities when asked, see :mod:`plait.serve.sampler`)
every rank          receives that answer (a broadcast from the sampler)
==================  ==============================================================

With ``pp > 1`` the decode is **pipelined**: the leader keeps up to ``pp`` steps (groups of
requests) in flight, so stage 0 computes one group while later stages compute the others. No message spans the replica, since a collective over the world
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

Step messages and answers travel on CPU control groups (gloo), hidden states and logits on the
device's groups (NCCL on CUDA): see :mod:`plait.serve.channels`. Decode sends a few kilobytes per
all-reduce, so the TP layers are moved to the ``auto`` communicator (plait's shared-memory backend
on one CPU host) unless ``tp_backend="torch"``; the model is then for inference only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import Communicator
from ..comm.base import Handle
from ..plan.memory import kv_bytes_per_token
from .batch import HEADER, IDLE, STEP, STOP, StepBatch, control, payload_size, unpack_outputs
from .channels import Channels
from .forward import StageRunner
from .kv_cache import KVCache, blocks_for
from .sampler import Histories, sample_step
from .sampling import Sampled


def local_kv_heads(model) -> int:
    """KV heads of this TP rank, as the parallel model's projections hold them (the family knows)."""
    return model.stages[0].family.local_kv_heads(model.dims, model.mesh.tp, model.mesh.tp_rank)


def context_length(model_config) -> int:
    """The most positions a request may use: the config's context, times the factor under dynamic rotary scaling
    (which exists to run past it; vLLM's rule)."""
    from ..parallel.families.llama import rope_params, rope_type

    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            if rope_type(model_config) == "dynamic":
                value = int(value * float(rope_params(model_config).get("factor") or 1.0))
            return value
    raise ValueError("the model config names no context length (max_position_embeddings); pass max_len")


def checked_max_len(model_config, max_len: Optional[int]) -> int:
    """``max_len``, or the model's context when None (ValueError unless in [1, context])."""
    limit = context_length(model_config)
    max_len = limit if max_len is None else max_len
    if not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise ValueError(f"max_len must be an integer in [1, {limit}] (the model's context), got {max_len!r}")
    return max_len


def cache_bytes_per_token(model) -> int:
    """KV-cache bytes one position costs on this rank: its layers and local KV heads, in the model's dtype."""
    layers = len(model.stages[0].layer_paths)
    value = torch.empty((), dtype=model.dtype).element_size()
    return kv_bytes_per_token(layers, local_kv_heads(model), model.dims.head_dim, value)


def cache_blocks(model, max_batch: int, max_len: int, block_size: int, kv_blocks: Optional[int] = None,
                 kv_memory: Optional[float] = None) -> int:
    """Blocks of every rank's KV cache: ``kv_blocks``; or as many as ``kv_memory`` bytes hold on the rank that
    holds fewest (a collective over the replica); or by default ``max_batch`` requests at ``max_len``."""
    if kv_blocks is not None and kv_memory is not None:
        raise ValueError("give kv_blocks or kv_memory, not both")
    if kv_blocks is not None:
        if not isinstance(kv_blocks, int) or kv_blocks < 1:
            raise ValueError(f"kv_blocks must be an integer >= 1, got {kv_blocks!r}")
        return kv_blocks
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if kv_memory is None:
        return max_batch * blocks_for(max_len, block_size)
    fits = torch.tensor([int(kv_memory // (block_size * cache_bytes_per_token(model)))], device=model.mesh.device)
    if model.mesh.world_size > 1:
        dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    if int(fits) < 1:
        raise ValueError(f"kv_memory of {kv_memory:.3g} bytes holds no block of {block_size} positions "
                         f"({cache_bytes_per_token(model)} bytes per position on rank {model.mesh.rank})")
    return int(fits)


def use_comm(stage, old, new) -> None:
    """Point every TP module of ``stage`` that talks over ``old`` at ``new`` (e.g. shm instead of gloo)."""
    for module in stage.modules():
        if getattr(module, "comm", None) is old:
            module.comm = new


class Worker:
    """This rank's part of a replica: its stage, its KV cache, and the step protocol (see module docstring).

    With ``record=True`` it keeps ``received``, the tokens this rank was sent per step (every rank when
    ``pp == 1``; the leader and the sampler when pipelined), and ``steps``, the ``(block tables, tokens)`` of every
    step message this rank ran, which is the same list on every rank of the replica.
    """

    def __init__(self, model, num_blocks: int, block_size: int, max_len: int, record: bool = False,
                 tp_backend: str = "auto") -> None:
        if len(model.stages) != 1:
            raise ValueError(f"serving needs one pipeline stage per rank (num_virtual=1), this rank has "
                             f"{len(model.stages)}")
        if model.mesh.dp != 1:
            raise ValueError(f"a serving replica is one (pp, tp) group; run dp replicas as separate worlds "
                             f"(plait serve --dp), not a mesh with dp={model.mesh.dp}")
        self.model, self.mesh = model, model.mesh
        model.eval()                     # serving never trains: no dropout, whatever mode the model came in
        stage = model.stages[0]
        self.dtype = model.dtype
        self.cache = KVCache(len(stage.layer_paths), num_blocks, block_size, local_kv_heads(model),
                             model.dims.head_dim, max_len, self.dtype, self.mesh.device)
        self.tp_comm = self.mesh.tp_comm
        if tp_backend != "torch" and self.mesh.tp > 1:      # collective over the TP group
            self.tp_comm = Communicator.create(tp_backend, self.mesh.tp_group, name="tp")
            use_comm(stage, self.mesh.tp_comm, self.tp_comm)
        self.runner = StageRunner(stage, self.cache)
        self.pipelined = self.mesh.pp > 1
        self.channels = Channels.of(self.mesh, tp_backend)
        self.world, self.stage_comm = self.channels.messages, self.channels.stage
        self.control_line, self.hidden_line = self.channels.control_line, self.channels.hidden_line
        self.sampler = self.mesh.rank_of(self.mesh.dp_rank, self.mesh.pp - 1, 0)
        self.leader = self.mesh.rank_of(self.mesh.dp_rank, 0, 0)
        self.histories = Histories(model.dims.vocab_size) if self.mesh.rank == self.sampler else None
        self.received: Optional[list[list[int]]] = [] if record else None
        self.steps: Optional[list[tuple[list[int], list[list[int]]]]] = [] if record else None
        self.max_len = max_len

    # ----------------------------------------------------------------- leader
    def send_control(self, op: int) -> None:
        """Leader only: tell every rank to idle or stop."""
        header = control(op)
        if not self.pipelined:
            self.world.broadcast(header, src=self.leader)
            return
        self.stage_comm.broadcast(header, src=0)
        self.control_line.send(header, dst=1)

    def step(self, batch: StepBatch) -> list[Optional[Sampled]]:
        """Leader only: send ``batch`` to every rank, run it, and return what the sampler chose per row."""
        if self.pipelined:
            return self.collect(self.launch(batch))
        self.world.broadcast(batch.header(), src=self.leader)
        self.world.broadcast(batch.payload(), src=self.leader)
        return self._answer(batch, self._compute(batch))

    def _answer(self, batch: StepBatch, out: Optional[torch.Tensor]) -> list[Optional[Sampled]]:
        """pp == 1: the sampler's answer to ``batch``, broadcast to every rank."""
        if out is None:
            out = torch.zeros(batch.size, batch.out_width, dtype=torch.int64)
        return self._received(self.world.broadcast(out, src=self.sampler), unpack=self.mesh.rank == self.leader)

    def launch(self, batch: StepBatch) -> Handle:
        """Leader only, pipelined: start ``batch`` down the pipeline; the handle's ``wait`` gives its tokens.

        Returns once stage 0 has run it, so the leader can launch another group while the later stages
        compute this one. The sampler answers in launch order.
        """
        header, payload = batch.header(), batch.payload()
        self.stage_comm.broadcast(header, src=0)
        self.stage_comm.broadcast(payload, src=0)
        answer = torch.empty(batch.size, batch.out_width, dtype=torch.int64)
        handle = self.control_line.recv(answer, src=self.mesh.pp - 1, async_op=True)
        self._compute(batch, header, payload)
        return handle

    def collect(self, handle: Handle) -> list[Optional[Sampled]]:
        """Leader only, pipelined: wait (bounded) for the sampler's answer to a launched step."""
        return self._received(handle.wait())

    # ----------------------------------------------------------------- followers
    def follow(self) -> None:
        """Every rank but the leader: run the steps the leader sends until it says stop."""
        while True:
            header = self._receive(torch.empty(HEADER, dtype=torch.int64))
            fields = header.tolist()
            op = fields[0]
            if op in (STOP, IDLE):
                if self.pipelined and not self.mesh.is_last_stage:
                    self.control_line.send(header, dst=self.mesh.pp_rank + 1)
                if op == STOP:
                    return
                continue
            if op != STEP:
                raise RuntimeError(f"rank {self.mesh.rank}: unknown step message {op}")
            payload = self._receive(torch.empty(payload_size(fields), dtype=torch.int64))
            step = StepBatch.from_payload(payload, fields)
            out = self._compute(step, header, payload)
            if not self.pipelined:
                self._answer(step, out)
            elif out is not None:                          # the sampler of a pipeline
                self.control_line.send(out, dst=0)
                self._received(out, unpack=False)

    def _receive(self, buffer: torch.Tensor) -> torch.Tensor:
        """The next part of a step message: from the leader (pp == 1, or stage 0), else from stage p-1."""
        if not self.pipelined:
            return self.world.broadcast(buffer, src=self.leader)
        if self.mesh.is_first_stage:
            return self.stage_comm.broadcast(buffer, src=0)
        return self.control_line.recv(buffer, src=self.mesh.pp_rank - 1)

    # ----------------------------------------------------------------- compute
    def _compute(self, batch: StepBatch, header: Optional[torch.Tensor] = None,
                 payload: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Run this rank's stage on ``batch`` (its parts one after the other, see :meth:`StepBatch.parts`): pass
        message and hidden states on (pipelined, not the last stage), or gather the logits (last stage).
        Returns the sampler's answer on the sampler, else None."""
        mesh = self.mesh
        if self.steps is not None:
            self.steps.append((batch.tables.tolist(), batch.row_tokens()))
        last = mesh.is_last_stage
        if not last:
            self.control_line.send(header, dst=mesh.pp_rank + 1)
            self.control_line.send(payload, dst=mesh.pp_rank + 1)
        rows, outputs = [], []
        for part in batch.parts():
            if mesh.is_first_stage:
                x = part.tokens.to(mesh.device)
            else:
                x = torch.empty(*part.tokens.shape, self.model.dims.hidden, dtype=self.dtype, device=mesh.device)
                self.hidden_line.recv(x, src=mesh.pp_rank - 1)
            y = self.runner(x, part.inputs(mesh.device))
            if not last:
                self.hidden_line.send(y.contiguous(), dst=mesh.pp_rank + 1)
                continue
            rows.append(part.rows[part.keep])
            outputs.append(y)
        if not last:
            return None
        if len(outputs) == 1:            # one part: its kept rows are the step's rows, in order
            local = outputs[0]
        else:
            local = torch.empty(batch.size, outputs[0].shape[-1], dtype=outputs[0].dtype, device=mesh.device)
            local[torch.cat(rows).to(mesh.device)] = torch.cat(outputs)
        logits = self.tp_comm.all_gather(local, dim=-1)[..., :self.model.dims.vocab_size]
        if mesh.rank != self.sampler:
            return None
        return sample_step(logits.cpu(), batch, self.histories)

    def _received(self, out: torch.Tensor, unpack: bool = True) -> list[Optional[Sampled]]:
        """Record the sampler's answer (when recording); the leader also unpacks it (followers drop it)."""
        if self.received is not None:
            self.received.append(out[:, 0].tolist())
        return unpack_outputs(out) if unpack else []
