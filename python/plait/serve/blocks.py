"""The leader's book of KV-cache blocks: which are free, who holds each, and the prefix cache.

Every block has a reference count (the requests whose tables hold it). A block that is full
of known tokens gets a **hash chain** key: a digest of the previous block's key and this
block's token ids, so equal keys mean equal token prefixes (and, since the model is the same,
equal keys and values). The prefix cache maps keys to blocks; a new request takes the longest
run of its prompt's keys that are cached (:meth:`BlockPool.match`) and computes only the rest.

A block nobody holds any more keeps its contents and its key, on an LRU list; a request that
needs a fresh block takes a never-used (or evicted) one first, then evicts the least recently
released cached block. So memory follows the tokens held, and a shared system prompt stays
cached while there is room.

=================  ==============================================================
state              meaning
=================  ==============================================================
``refs[b]``        requests holding block ``b``
``key_of[b]``      its hash chain key, when it is in the prefix cache
``cached[key]``    the block holding the prefix ``key``
``idle``           cached blocks with no holder, least recently released first
``fresh``          blocks with no holder and no key
=================  ==============================================================
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional, Sequence

import torch


def block_keys(tokens: Sequence[int], block_size: int, start: int = 0, parent: Optional[bytes] = None
               ) -> list[bytes]:
    """Hash chain keys of the full blocks of ``tokens`` from block ``start`` on, ``parent`` being block
    ``start - 1``'s key (None for the first block)."""
    keys = []
    for first in range(start * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent or b"", digest_size=16)
        digest.update(torch.tensor(tokens[first:first + block_size], dtype=torch.int64).numpy().tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys


class BlockPool:
    """See the module docstring. ``caching=False`` turns the prefix cache off (every block is private)."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.fresh = collections.deque(range(num_blocks))

    @property
    def available(self) -> int:
        """Blocks a request can take now: fresh ones and cached ones nobody holds."""
        return len(self.fresh) + len(self.idle)

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return self.num_blocks - self.available

    def allocate(self, count: int) -> list[int]:
        """``count`` blocks for one holder (ValueError if fewer are available: check :attr:`available`)."""
        if count > self.available:
            raise ValueError(f"{count} blocks asked, {self.available} available")
        out = []
        for _ in range(count):
            if self.fresh:
                block = self.fresh.popleft()
            else:
                block, _ = self.idle.popitem(last=False)             # evict the least recently released
                del self.cached[self.key_of.pop(block)]
            self.refs[block] = 1
            out.append(block)
        return out

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached run of ``keys`` (a prompt's chain), each now held once more."""
        out = []
        if not self.caching:
            return out
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1
            out.append(block)
        return out

    def register(self, block: int, key: bytes) -> None:
        """Offer ``block`` (full, its tokens known) to the prefix cache under ``key``; a prefix cached already
        keeps its block, and this one stays private."""
        if self.caching and key not in self.cached and block not in self.key_of:
            self.cached[key] = block
            self.key_of[block] = key

    def is_cached(self, key: bytes) -> bool:
        return key in self.cached

    def release(self, blocks: Sequence[int]) -> None:
        """One holder lets go of ``blocks``; a block nobody holds stays cached (LRU) if it has a key, else is fresh."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise ValueError(f"block {block} is not held")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.fresh.append(block)
