"""TensorBoard logging of a training job (``plait train --tensorboard DIR``), on global rank 0.

Each step writes the scalars ``train/loss``, ``train/lr``, ``train/grad_norm`` and
``train/tokens_per_s`` (and ``eval/loss`` on evaluation steps) at the step number, through
``torch.utils.tensorboard.SummaryWriter``; view them with ``tensorboard --logdir DIR``. It
needs the ``tensorboard`` package (``pip install 'plait[train]'``): without it
:func:`check_available` refuses the job, on every rank and before any process communicates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}


def check_available() -> None:
    """ValueError, saying what to install, unless ``torch.utils.tensorboard`` can be imported."""
    try:
        import torch.utils.tensorboard  # noqa: F401 - imports tensorboard itself
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package ({err}): pip install tensorboard "
                         f"(or 'plait[train]'), or leave --tensorboard out") from None


class TensorBoardLog:
    """A SummaryWriter for one job; ``log(record)`` per step, ``close()`` at the end."""

    def __init__(self, log_dir: Union[str, Path]) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(log_dir=str(log_dir))
        except OSError as err:
            raise ValueError(f"{log_dir}: cannot write TensorBoard logs there ({err.strerror or err})") from None

    def log(self, record) -> None:
        """Write the step's scalars (a :class:`~plait.train.loop.StepRecord`; missing eval loss skipped)."""
        for field, tag in SCALARS.items():
            value = getattr(record, field)
            if value is not None:
                self.writer.add_scalar(tag, value, record.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
