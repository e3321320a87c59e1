"""Reference-counted pool of KV blocks.

Blocks are integers into the KV tensors of a ``PagedKVCache``. ``allocate`` hands out blocks with
reference count 1, ``share`` adds a reference (a prompt block used by several samples), ``release``
drops one and returns the block to the free list at zero. The counters (``num_used``, ``peak_used``)
are what tests assert on to see prefix sharing happen.
"""

from __future__ import annotations


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.ref_counts = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int = 1) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked for {count} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        for b in blocks:
            self.ref_counts[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"sharing free block {b}"
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

    def reset(self) -> None:
        """Free every block (between generate calls: stale KV is invalid after a weight update)."""
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.ref_counts = [0] * self.num_blocks
        self.peak_used = 0
