"""Words for a ranking: what the winner spends its time and memory on, and what the runner-up trades.

The runner-up is the best layout with a different (dp, pp, tp) split, so the comparison
is between two ways of cutting the model rather than two microbatch sizes of one cut;
when every kept layout shares the winner's split, the second-ranked one is used.
"""
from __future__ import annotations

from .estimate import Estimate

TERM_NAMES = {
    "gemm": "GEMMs", "logits": "the output layer", "attention": "attention", "elementwise": "element-wise kernels",
    "recompute": "recomputation", "tp_comm": "tensor-parallel communication",
    "pp_comm": "pipeline sends", "bubble": "the pipeline bubble", "dp_comm": "gradient reduction",
    "optimizer": "the optimizer step", "prefill": "prefill", "decode_weights": "streaming weights",
    "decode_kv": "reading the KV cache", "overhead": "kernel launches",
}


def describe(est: Estimate) -> str:
    """One layout in words: split, schedule, recomputation and the headline numbers."""
    sp = ", SP" if est.sequence_parallel else ""
    if est.mode == "inference":
        return (f"{est.layout.short().rsplit(' mbs', 1)[0]}: {est.requests_per_s:.2f} requests/s, "
                f"TTFT {est.ttft_s * 1e3:.0f} ms, TPOT {est.tpot_s * 1e3:.1f} ms, {est.memory_gb:.1f} GB/GPU")
    return (f"{est.layout.short()} ({est.recompute} recompute{sp}, {est.num_microbatches} microbatches): "
            f"{est.tokens_per_s:,.0f} tokens/s, {est.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {est.mfu:.0%}, "
            f"{est.memory_gb:.1f} of {est.memory_capacity_gb:.0f} GB per GPU")


def _shares(est: Estimate) -> list[tuple[str, float]]:
    total = sum(est.time.values()) or 1.0
    return sorted(((k, v / total) for k, v in est.time.items() if v > 0), key=lambda kv: -kv[1])


def runner_up(ranked: list[Estimate]) -> Estimate | None:
    """The best layout whose (dp, pp, tp) differs from the winner's, else the second one."""
    if len(ranked) < 2:
        return None
    split = lambda e: (e.layout.dp, e.layout.pp, e.layout.tp)  # noqa: E731
    return next((e for e in ranked[1:] if split(e) != split(ranked[0])), ranked[1])


def _trade(best: Estimate, other: Estimate) -> str:
    """How `other` differs from `best`: slower/faster, which terms grow and shrink, memory."""
    if best.mode == "inference":
        speed = f"{other.requests_per_s / best.requests_per_s - 1:+.0%} requests/s, TPOT {other.tpot_s * 1e3:.1f} ms"
    else:
        speed = f"{other.step_time_s / best.step_time_s - 1:+.1%} step time"
    deltas = sorted(((k, other.time.get(k, 0.0) - best.time.get(k, 0.0)) for k in set(best.time) | set(other.time)),
                    key=lambda kv: kv[1])
    parts = []
    gained, lost = deltas[0], deltas[-1]
    if lost[1] > 0:
        parts.append(f"spends {lost[1]:.3g} s more on {TERM_NAMES.get(lost[0], lost[0])}")
    if gained[1] < 0:
        parts.append(f"saves {-gained[1]:.3g} s of {TERM_NAMES.get(gained[0], gained[0])}")
    memory = other.memory_gb - best.memory_gb
    parts.append(f"needs {abs(memory):.1f} GB {'more' if memory >= 0 else 'less'} memory per GPU")
    return f"({speed}) " + ", ".join(parts)


def explain(ranked: list[Estimate], objective: str) -> str:
    """A short paragraph: the winner, its dominant terms, and the runner-up's trade."""
    best = ranked[0]
    shares = _shares(best)
    top = ", ".join(f"{TERM_NAMES.get(k, k)} {s:.0%}" for k, s in shares[:3])
    unit = "per request batch" if best.mode == "inference" else "per step"
    lines = [f"Best for {objective}: {describe(best)}.",
             f"Its {best.step_time_s:.3g} s {unit} is dominated by {TERM_NAMES.get(shares[0][0], shares[0][0])} "
             f"({top}); memory: " + ", ".join(f"{k} {v:.1f} GB" for k, v in best.memory.as_dict().items()
                                               if v > 0.05 and k != "total") + "."]
    other = runner_up(ranked)
    if other is not None:
        lines.append(f"Runner-up {describe(other)} {_trade(best, other)}.")
    return "\n".join(lines)
