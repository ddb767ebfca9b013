"""The shm communicator on 2, 3 and 4 processes: every operation, count and dtype, exactly.

Every rank builds every rank's input from a seed, so each check knows the exact
expected result: reductions are compared bit for bit with a left-to-right reduction
in rank order (fp32 accumulation for fp16/bf16), which is what the shm backend
promises on every rank. The 3-rank world runs the portable scalar reduction path
with tiny slots and rings, so the same checks also cover chunking, slot reuse and
ring wrap-around; the others run the best SIMD path with the default sizes.
"""
import pytest
import torch

from plait.launch import run_ranks

REDUCIBLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64)
FLOATS = REDUCIBLE[:4]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}


def data(rank: int, shape, dtype, salt: int) -> torch.Tensor:
    """Rank ``rank``'s input: small integers for int dtypes, randn * 4 for floats."""
    gen = torch.Generator().manual_seed(7919 * salt + rank)
    if dtype in (torch.int32, torch.int64):
        return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 4).to(dtype)


def expected(inputs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Left-to-right reduction in rank order in the accumulator type, rounded once."""
    acc_dtype = torch.float32 if inputs[0].dtype in (torch.float16, torch.bfloat16) else inputs[0].dtype
    acc = inputs[0].to(acc_dtype)
    for x in inputs[1:]:
        x = x.to(acc_dtype)
        acc = acc + x if op in ("sum", "avg") else (torch.maximum(acc, x) if op == "max" else torch.minimum(acc, x))
    if op == "avg":
        acc = acc / len(inputs)
    return acc.to(inputs[0].dtype)


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}"
    view = INT_VIEW[got.element_size()]
    a, b = got.contiguous().view(view), want.contiguous().view(view)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}")


def check_all_reduce(comm, rank: int, world: int, counts) -> int:
    checks = 0
    for count in counts:
        for dtype in REDUCIBLE:
            ops = ("sum", "max", "min", "avg") if dtype in FLOATS else ("sum", "max", "min")
            for op in ops:
                inputs = [data(r, (count,), dtype, checks) for r in range(world)]
                mine = inputs[rank].clone()
                assert comm.all_reduce(mine, op=op) is mine
                same_bits(mine, expected(inputs, op), f"all_reduce count={count} {dtype} {op}")
                checks += 1
    # views: non-contiguous (transposed), and misaligned (one element into the storage)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [data(r, (33, 10), dtype, 99) for r in range(world)]
        mine = inputs[rank].clone().t()
        comm.all_reduce(mine)
        same_bits(mine, expected(inputs, "sum").t(), f"all_reduce transposed {dtype}")
        storage = [data(r, (4098,), dtype, 98) for r in range(world)]
        mine = storage[rank].clone()[1:]
        comm.all_reduce(mine, async_op=True).wait()
        same_bits(mine, expected([s[1:] for s in storage], "sum"), f"all_reduce misaligned {dtype}")
        checks += 2
    return checks


def check_gather_scatter_broadcast(comm, rank: int, world: int) -> int:
    checks = 0
    shapes = [(5,), (world * 3, 7), (2, world * 2, 3), (world * 4, 70000)]  # the last one spans chunks
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.int8, torch.complex64):
            if shape[-1] == 70000 and dtype not in (torch.float32, torch.int8):
                continue
            inputs = [data(r, shape, dtype, 10 + checks) for r in range(world)]
            for dim in range(len(shape)):
                got = comm.all_gather(inputs[rank], dim=dim, async_op=dim % 2 == 1)
                got = got.wait() if dim % 2 == 1 else got
                same_bits(got, torch.cat(inputs, dim=dim), f"all_gather {dtype}{list(shape)} dim={dim}")
                checks += 1
                if dtype in REDUCIBLE and shape[dim] % world == 0:
                    for op in ("sum", "max") if dtype in (torch.int64,) else ("sum", "avg", "min"):
                        got = comm.reduce_scatter(inputs[rank], dim=dim, op=op)
                        want = expected(inputs, op).chunk(world, dim=dim)[rank]
                        same_bits(got, want, f"reduce_scatter {dtype}{list(shape)} dim={dim} {op}")
                        checks += 1
            src = checks % world
            mine = inputs[rank].clone()
            comm.broadcast(mine, src=src)
            same_bits(mine, inputs[src], f"broadcast {dtype}{list(shape)} from {src}")
            checks += 1
    empty = comm.all_gather(torch.empty(0, 3), dim=0)
    assert empty.shape == (0, 3)
    return checks


def check_send_recv(comm, rank: int, world: int) -> int:
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    checks = 0
    for numel in (0, 1, 4097, 300_001):  # 300k floats span several ring slots
        outbox = torch.arange(numel, dtype=torch.float32) + 1000 * rank
        inbox = torch.full((numel,), -1.0)
        handles = [comm.send(outbox, dst=nxt, async_op=True), comm.recv(inbox, src=prv, async_op=True)]
        for h in handles:
            h.wait()
        assert torch.equal(inbox, torch.arange(numel, dtype=torch.float32) + 1000 * prv), f"ring {numel}"
        checks += 1
    # synchronous pairs: even ranks send first, odd ranks receive first
    for peer in range(world):
        if peer == rank:
            continue
        out, box = torch.full((1000,), float(rank)), torch.empty(1000)
        if rank < peer:
            comm.send(out, dst=peer)
            comm.recv(box, src=peer)
        else:
            comm.recv(box, src=peer)
            comm.send(out, dst=peer)
        assert torch.equal(box, torch.full((1000,), float(peer)))
        checks += 1
    return checks


def check_back_to_back(comm, rank: int, world: int) -> int:
    """1,000 small all-reduces with no barrier, then rounds of interleaved operations."""
    base = torch.arange(1, 9, dtype=torch.float32)
    for i in range(1000):
        x = base * (rank + 1) + i
        got = comm.all_reduce(x, async_op=i % 3 == 0)
        got = got.wait() if i % 3 == 0 else got
        want = base * (world * (world + 1) // 2) + i * world
        assert torch.equal(got, want), f"back-to-back all_reduce {i}: {got.tolist()} != {want.tolist()}"
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for i in range(100):
        size = 3 + (i * 37) % 2000
        v = torch.full((size,), float(rank + i))
        assert torch.equal(comm.all_reduce(v.clone(), op="max"), torch.full((size,), float(world - 1 + i)))
        g = comm.all_gather(torch.tensor([rank, i]), dim=0)
        assert g.tolist() == [x for r in range(world) for x in (r, i)]
        b = comm.broadcast(torch.tensor([float(rank)] * 5), src=i % world)
        assert b.tolist() == [float(i % world)] * 5
        rs = comm.reduce_scatter(torch.ones(world * 4, dtype=torch.int32) * (rank + 1), dim=0)
        assert rs.tolist() == [world * (world + 1) // 2] * 4
        if i % 10 == 0:
            comm.barrier()
        box = torch.empty(size)
        h = comm.send(v, dst=nxt, async_op=True)
        comm.recv(box, src=prv)
        h.wait()
        assert torch.equal(box, torch.full((size,), float(prv + i)))
    return 1100


COUNTS = (1, 7, 4097, 1_000_003)
SMALL_SLOTS = {"PLAIT_SHM_SIMD": "scalar", "PLAIT_SHM_SLOT_BYTES": "64K", "PLAIT_SHM_CHANNEL_BYTES": "4K",
               "PLAIT_SHM_ONESHOT_BYTES": "4K"}


def everything(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="world")
    assert (comm.rank, comm.size, comm.global_ranks) == (rank, world, list(range(world)))
    counts = {
        "all_reduce": check_all_reduce(comm, rank, world, COUNTS),
        "gather_scatter_broadcast": check_gather_scatter_broadcast(comm, rank, world),
        "send_recv": check_send_recv(comm, rank, world),
        "back_to_back": check_back_to_back(comm, rank, world),
    }
    if world == 4:  # two groups of two: group ranks, separate segments, no cross-talk
        sub, _ = dist.new_subgroups(group_size=2)
        pair = Communicator.create("shm", sub, name="pair")
        assert pair.size == 2 and pair.rank == rank % 2 and pair.global_ranks == [rank - rank % 2, rank - rank % 2 + 1]
        got = pair.all_reduce(torch.full((100,), float(rank)))
        assert torch.equal(got, torch.full((100,), float(2 * (rank - rank % 2) + 1)))
        box = torch.empty(3)
        pair.send(torch.full((3,), float(rank)), dst=1 - pair.rank, async_op=True)
        pair.recv(box, src=1 - pair.rank)
        assert torch.equal(box, torch.full((3,), float(pair.global_ranks[1 - pair.rank])))
        counts["subgroups"] = 1
    comm.close()
    dist.destroy_process_group()
    return {"simd": comm.simd, **counts}


@pytest.mark.parametrize("world, env", [(2, {}), (3, SMALL_SLOTS), (4, {})], ids=["2ranks", "3ranks-scalar-chunked",
                                                                                  "4ranks"])
def test_every_operation_exact(world, env):
    results = run_ranks(everything, world, env=env, timeout=300)
    assert all(r == results[0] for r in results), results
    if env.get("PLAIT_SHM_SIMD") == "scalar":
        assert results[0]["simd"] == "scalar"
    assert results[0]["all_reduce"] == len(COUNTS) * 22 + 4


def bad_input(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    from plait.comm import Communicator

    dist.init_process_group("gloo")
    comm = Communicator.create("shm", None, name="world")
    messages = []
    for call in (lambda: comm.all_reduce(torch.ones(2, device="meta")),
                 lambda: comm.all_reduce(torch.ones(2, dtype=torch.int8)),
                 lambda: comm.all_reduce(torch.ones(2, dtype=torch.int32), op="avg"),
                 lambda: comm.all_reduce(torch.ones(2), op="prod"),
                 lambda: comm.reduce_scatter(torch.ones(3), dim=0),
                 lambda: comm.send(torch.ones(1), dst=rank),
                 lambda: comm.recv(torch.ones(4, 2).t(), src=1 - rank),
                 lambda: comm.broadcast(torch.ones(1), src=world),
                 lambda: comm.all_gather(torch.ones(3), dim=1),
                 lambda: comm.reduce_scatter(torch.ones(4, 4), dim=-3)):
        try:
            call()
        except ValueError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError("bad input was accepted")
    assert torch.equal(comm.all_reduce(torch.ones(3)), torch.full((3,), 2.0))  # still in step: nothing was sent
    # a recv whose size differs from the send is an error, not a silent mix-up
    other = Communicator.create("shm", None, name="mismatch")
    if rank == 0:
        other.send(torch.ones(10), dst=1)
    else:
        try:
            other.recv(torch.empty(12), src=0)
        except Exception as exc:  # noqa: BLE001 - the type is checked in the test
            messages.append(f"{type(exc).__name__}: {exc}")
    comm.barrier()
    dist.destroy_process_group()
    return messages


def test_bad_input_is_rejected_with_a_clear_error():
    messages = run_ranks(bad_input, 2)
    first = messages[0]
    assert "CPU tensors" in first[0] and "'torch'" in first[0] and "'ipc'" in first[0]
    assert "int8" in first[1] and "avg" in first[2] and "prod" in first[3] and "not divisible" in first[4]
    assert "this rank itself" in first[5] and "contiguous" in first[6] and "not a rank" in first[7]
    assert "dim 1 is out of range" in first[8] and "dim -3 is out of range" in first[9]
    mismatch = messages[1][-1]
    assert mismatch.startswith("CommError") and "12" not in mismatch.split("recv")[0]
    assert "40 bytes" in mismatch and "48 bytes" in mismatch and "same size" in mismatch
    assert "rank 1 of group 'mismatch'" in mismatch
