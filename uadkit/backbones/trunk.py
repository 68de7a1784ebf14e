"""What every backbone trunk shares: a stem, then blocks in order, each block the last of a named stage or not.

A trunk says only how its stem runs, which modules its blocks are and which stage each one belongs to; running
the stages, naming the leading modules and starting after the first blocks are the same for every trunk.
"""

from __future__ import annotations

import torch
from torch import nn


class Trunk(nn.Module):
    stem_modules: tuple[str, ...] = ()  # the stem's modules with weights, in the order `stem` runs them

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_names(self) -> list[str]:
        """Module names of the blocks, in order."""
        raise NotImplementedError

    def block_stages(self) -> list[str]:
        """The stage each block (in order) belongs to."""
        raise NotImplementedError

    def leading_modules(self, n_blocks: int) -> list[str]:
        """Names of the modules that compute the stem and the first `n_blocks` blocks, in order."""
        return list(self.stem_modules) + self.block_names()[:n_blocks]

    def blocks_through(self, stage: str) -> int:
        """How many blocks compute `stage` (its last block included)."""
        return 1 + max(i for i, s in enumerate(self.block_stages()) if s == stage)

    def forward_prefix(self, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """The output of the stem and the first `n_blocks` blocks (what `forward_stages(..., start=n_blocks)` takes)."""
        return self.run_blocks(x, [], None, n_blocks)[1]

    def forward_stages(self, x: torch.Tensor, stages: list[str], start: int | None = None
                       ) -> dict[str, torch.Tensor]:
        """The named stages' outputs from normalised images; with `start` N, from the output of the stem and
        the first N blocks (`forward_prefix`), which are not run again."""
        return self.run_blocks(x, stages, start, None)[0]

    def run_blocks(self, x: torch.Tensor, stages: list[str], start: int | None, prefix: int | None
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The named stages' outputs and, with `prefix` N, the output of the stem and the first N blocks on
        the way; `start` as in `forward_stages`."""
        names, owners = self.block_names(), self.block_stages()
        last = {s: i for i, s in enumerate(owners)}
        early = [s for s in stages if start is not None and last[s] < start]
        if early:
            raise ValueError(f"stage {early[0]} ends within the first {start} blocks, which this call skips")
        stop = max([last[s] for s in stages] + [prefix - 1 if prefix is not None else -1])
        wanted = set(stages)
        out, kept = {}, None
        if start is None:
            x, start = self.stem(x), 0
        if prefix == start:
            kept = x
        for i in range(start, stop + 1):
            x = self.get_submodule(names[i])(x)
            if owners[i] in wanted and last[owners[i]] == i:
                out[owners[i]] = x
            if prefix == i + 1:
                kept = x
        return out, kept
