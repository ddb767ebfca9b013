"""plait.train: the training job behind ``plait train`` (any parallelized model, real data, resumable).

    job = TrainJob(model="hf-dir", data="tokens.bin", seq=1024, global_batch=16, steps=1000,
                   dp=2, pp=2, tp=2, save="ckpt", save_every=100)
    summary = train_rank(job)           # on every rank (torchrun, or plait.launch.run_ranks)

Modules, one job each: :mod:`~plait.train.job` (the settings), :mod:`~plait.train.data`
(token files and batches), :mod:`~plait.train.optim` (AdamW, schedule, clipping, DP),
:mod:`~plait.train.recompute`, :mod:`~plait.train.checkpoint`, :mod:`~plait.train.loop`
(one rank's run), :mod:`~plait.train.cli` (``plait train`` and ``plait data prepare``).
Needs the ``hf`` and ``train`` extras: ``pip install 'plait[hf,train]'``.
"""
from .job import TrainJob
from .loop import StepRecord, Summary, train_rank

__all__ = ["TrainJob", "train_rank", "StepRecord", "Summary"]
