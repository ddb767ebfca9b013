"""The torch Communicator: every operation against a locally computed expectation."""
import time

import pytest
import torch

from plait.launch import run_ranks


def _data(rank: int, shape, dtype, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * salt + rank)
    return (torch.randn(*shape, generator=gen) * 4).to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 sums round at every step (values here are ~4): absolute tolerance 0.1; else tight."""
    loose = got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.double(), rtol=2e-2 if loose else 1e-6,
                               atol=1e-1 if loose else 1e-5)


def collectives(rank: int, world: int) -> int:
    import plait
    from plait.comm import Communicator

    plait.init_mesh(tp=world)
    comm = Communicator.create("torch", None, name="world")
    assert (comm.rank, comm.size, comm.global_ranks) == (rank, world, list(range(world)))
    checks = 0
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int64):
        for shape in ((1,), (7,), (world * 5, 3), (2, world * 4, 3)):
            everyone = [_data(r, shape, dtype, checks) for r in range(world)]
            stacked = torch.stack(everyone).to(torch.float64)
            for op, want in (("sum", stacked.sum(0)), ("max", stacked.max(0).values),
                             ("min", stacked.min(0).values)):
                got = comm.all_reduce(everyone[rank].clone(), op=op)
                _close(got, want.to(dtype))
            if dtype.is_floating_point:
                got = comm.all_reduce(everyone[rank].clone(), op="avg", async_op=True).wait()
                _close(got, stacked.sum(0).to(dtype) / world)
            for dim in range(len(shape)):
                got = comm.all_gather(everyone[rank], dim=dim, async_op=(dim % 2 == 1))
                got = got.wait() if dim % 2 == 1 else got
                assert torch.equal(got, torch.cat(everyone, dim=dim))
                if shape[dim] % world == 0:
                    got = comm.reduce_scatter(everyone[rank].clone(), dim=dim)
                    want = stacked.sum(0).to(dtype).chunk(world, dim=dim)[rank]
                    _close(got, want)
            src = checks % world
            got = comm.broadcast(everyone[rank].clone(), src=src)
            assert torch.equal(got, everyone[src])
            checks += 1
    # point to point around a ring, async both ways
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if world > 1:
        inbox = torch.empty(5, 2)
        handles = [comm.send(torch.full((5, 2), float(rank)), dst=nxt, async_op=True),
                   comm.recv(inbox, src=prv, async_op=True)]
        for h in handles:
            h.wait()
        assert torch.equal(inbox, torch.full((5, 2), float(prv)))
    comm.barrier()
    # many small back-to-back operations keep their order
    total = torch.zeros(1)
    pending = [comm.all_reduce(torch.ones(1) * i, async_op=True) for i in range(50)]
    for i, h in enumerate(pending):
        assert h.wait().item() == i * world
        total += i
    plait.destroy_mesh()
    return checks


@pytest.mark.parametrize("world", [2, 3])
def test_collectives(world):
    assert run_ranks(collectives, world) == [16] * world


def bad_arguments(rank: int, world: int) -> str:
    import plait
    from plait.comm import Communicator

    plait.init_mesh(tp=world)
    comm = Communicator.create("torch", None, name="world")
    messages = []
    for call in (lambda: comm.all_reduce(torch.ones(2), op="prod"),
                 lambda: comm.reduce_scatter(torch.ones(3), dim=0),
                 lambda: comm.send(torch.ones(1), dst=world),
                 lambda: comm.broadcast(torch.ones(1), src=-1),
                 lambda: comm.all_gather(torch.ones(3), dim=1),
                 lambda: comm.reduce_scatter(torch.ones(4, 4), dim=-3),
                 lambda: Communicator.create("nope")):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    comm.barrier()  # still usable: nothing was sent
    plait.destroy_mesh()
    return " | ".join(messages)


def test_bad_arguments_rejected_before_communication():
    text = run_ranks(bad_arguments, 2)[0]
    assert "prod" in text and "not divisible" in text and "group size 2" in text and "nope" in text
    assert "dim 1 is out of range" in text and "dim -3 is out of range" in text


def peer_never_joins(rank: int, world: int) -> str:
    import plait
    from plait.comm import Communicator
    from plait.errors import CommTimeoutError

    plait.init_mesh(tp=world)
    comm = Communicator.create("torch", plait.current_mesh().tp_group, name="tp", timeout_s=2.0)
    if rank == 1:
        time.sleep(6)  # never calls the all_reduce
        return "skipped"
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(16))
    except CommTimeoutError as exc:
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"timeout took {elapsed:.1f} s for a 2 s bound"
        return str(exc)
    raise AssertionError("all_reduce returned although rank 1 never joined")


def test_missing_peer_raises_timeout_naming_rank_group_and_op():
    message = run_ranks(peer_never_joins, 2, timeout=60)[0]
    assert "rank 0" in message and "'tp'" in message and "all_reduce" in message and "2 s" in message
