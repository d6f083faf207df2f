"""The hypernetworks: one residual network per weight shape over [x, δ], standardised
by running statistics, and the learned per-module edit learning rates (and λ)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-dimension running mean/std (Welford, float64 buffers); identity before two
    samples have been seen."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        if len(x) == 0:
            return
        n_a, n_b = self.count.clone(), float(len(x))
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        delta = mean_b - self.mean
        n = n_a + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * n_a * n_b / n
        self.count.copy_(n)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in fp32; (0, 1) before two samples. Dimensions whose std is below
        1e-6 of the largest are floored there."""
        if float(self.count) < 2:
            return torch.zeros_like(self.mean, dtype=torch.float32), torch.ones_like(self.mean, dtype=torch.float32)
        std = (self.m2 / (self.count - 1)).sqrt()
        std = std.clamp_min(max(float(std.max()) * 1e-6, 1e-30))
        return self.mean.float(), std.float()


class ResidualBlock(nn.Module):
    """y ↦ y + scale_m ⊙ relu(y A B + b) + shift_m (MALMEN's block; MEND's ``LRLinear``
    with per-module scale/shift). B = 0, shift = 0, scale = 1 at init: the identity.
    ``clamp`` rather than ``relu`` so that the gradient at 0 is not 0 (as MEND)."""

    def __init__(self, size: int, rank: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        r = min(rank, size)
        self.A = nn.Parameter(torch.randn(size, r, generator=generator))
        self.B = nn.Parameter(torch.zeros(r, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, y: torch.Tensor, idx: int) -> torch.Tensor:
        h = ((y @ self.A) @ self.B + self.bias).clamp(min=0)
        return y + self.scale[idx] * h + self.shift[idx]


class FactorNet(nn.Module):
    """The network of one weight shape (d_in, d_out): standardise [x, δ], residual
    blocks, optionally map back; returns (x̃, δ̃)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out)
        self.blocks = nn.ModuleList([ResidualBlock(d_in + d_out, rank, n_modules, generator) for _ in range(n_blocks)])

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, idx: int, denormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.norm.stats()
        z = (torch.cat([keys, grads], -1) - mean) / std
        for blk in self.blocks:
            z = blk(z, idx)
        if denormalize:
            z = z * std + mean
        return z[:, : self.d_in], z[:, self.d_in :]


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class HyperNet(nn.Module):
    """One :class:`FactorNet` per weight shape, shared by the modules of that shape
    (each with its own scale/shift index); a learned edit learning rate per module and,
    with ``with_lambda``, a learned log-regulariser λ per module (MALMEN)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, n_blocks: int, edit_lr: float, *,
                 with_lambda: bool = False, lambda_init: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        counts: dict[str, int] = {}
        self.slots: list[tuple[str, int]] = []
        for s in self.shapes:
            k = shape_key(s)
            self.slots.append((k, counts.get(k, 0)))
            counts[k] = counts.get(k, 0) + 1
        self.nets = nn.ModuleDict({k: FactorNet(*map(int, k.split("x")), rank, n_blocks, c, g) for k, c in counts.items()})
        self.lr = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))
        self.log_lambda = nn.Parameter(torch.full((len(self.shapes),), float(lambda_init))) if with_lambda else None

    def factors(self, i: int, keys: torch.Tensor, grads: torch.Tensor, denormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-factors (x̃, δ̃) of module ``i``."""
        k, idx = self.slots[i]
        return self.nets[k](keys, grads, idx, denormalize)

    def observe(self, i: int, keys: torch.Tensor, grads: torch.Tensor) -> None:
        """Update the running statistics of module ``i``'s shape network."""
        self.nets[self.slots[i][0]].norm.update(torch.cat([keys, grads], -1))

    def network_parameters(self) -> list[nn.Parameter]:
        return list(self.nets.parameters())

    def rate_parameters(self) -> list[nn.Parameter]:
        return [self.lr] + ([self.log_lambda] if self.log_lambda is not None else [])
