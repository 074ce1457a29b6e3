"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, optional top-n logprobs.

Every operation is row-wise and batched (no per-request tensor ops), and one host sync per step
reads the tokens back. A seeded request's noise is a pure function of (seed, token position,
vocab id) (`seeded_uniform`), so its tokens depend neither on the rest of the batch nor on where
the request runs: resumed on another worker from prompt + tokens so far, it draws the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batonserve.kernels.cpu.argmax import argmax_rows
from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per logits row."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def seeded_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), [rows, vocab] float32: a counter-based hash of (seed, position, id).

    seeds, positions: [rows] int64. The same triple gives the same number on any device and
    in any batch, which is what makes seeded sampling exact across a resume.
    """
    key = _mix64(_mix64(seeds * _GOLDEN + 1) + positions)  # [rows]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * _GOLDEN  # [vocab]
    bits = _mix64(key[:, None] + ids[None, :])  # [rows, vocab]
    return (_shr(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # top 24 bits, never 0 or 1


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Set every token outside each row's top-k / top-p nucleus to -inf.

    logits: [rows, vocab] float32; top_k: [rows] int64 (0 = off); top_p: [rows] float32.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    rank = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
    before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


class Sampler:
    """Turns logits rows into tokens according to each row's SamplingParams."""

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        # Requests without a seed share this generator (reproducible per engine, not per request).
        self.default_generator = make_generator(seed, self.device)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        positions: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row. logits: [rows, vocab] float32.

        positions[i]: the index in its sequence (prompt + output) of the token row i draws;
        seeded rows need it (their noise is keyed by seed and position).
        """
        rows = logits.shape[0]
        assert len(params) == rows
        if rows == 0:
            return SamplerOutput((), ())
        # [rows]; greedy rows keep this: the first maximum (torch.argmax's; a C kernel on CPU,
        # where torch's index reduction is several times slower than the read).
        tokens = argmax_rows(logits)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            tokens = tokens.clone()
            picked = self._sample_random(logits, params, positions, random_rows)
            tokens[torch.tensor(random_rows, device=logits.device)] = picked
        token_list = tokens.tolist()  # the step's one host sync
        return SamplerOutput(tuple(token_list), self._logprobs(logits, params, token_list))

    def _sample_random(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        positions: Sequence[int] | None,
        rows: list[int],
    ) -> torch.Tensor:
        """Tokens [len(rows)] drawn for the non-greedy rows, all rows at once."""
        dev = logits.device
        ps = [params[i] for i in rows]
        sub = logits.index_select(0, torch.tensor(rows, device=dev))  # [r, vocab]
        sub = sub / torch.tensor([p.temperature for p in ps], device=dev).unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in ps):
            top_k = torch.tensor([p.top_k for p in ps], device=dev)
            top_p = torch.tensor([p.top_p for p in ps], device=dev, dtype=torch.float32)
            sub = apply_top_k_top_p(sub, top_k, top_p)
        probs = sub.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. E = -log(U): seeded rows
        # take U from their (seed, position) hash, the others from the engine's generator.
        u = torch.empty_like(probs).uniform_(generator=self.default_generator)
        seeded = [j for j, p in enumerate(ps) if p.seed is not None]
        if seeded:
            assert positions is not None, "seeded sampling needs each row's token position"
            seeds = torch.tensor([ps[j].seed for j in seeded], device=dev, dtype=torch.int64)
            pos = torch.tensor([positions[rows[j]] for j in seeded], device=dev)
            u[torch.tensor(seeded, device=dev)] = seeded_uniform(seeds, pos, probs.shape[-1])
        return (probs / -torch.log(u)).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, params: Sequence[SamplingParams], tokens: list[int]
    ) -> tuple[TokenLogprobs | None, ...]:
        """Per-row logprob of the sampled token and the top-n, for rows that asked."""
        out: list[TokenLogprobs | None] = [None] * len(params)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not want:
            return tuple(out)
        dev = logits.device
        lp = logits.index_select(0, torch.tensor(want, device=dev)).log_softmax(dim=-1)
        chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in want], device=dev))[:, 0]
        n_max = min(max(params[i].logprobs or 0 for i in want), lp.shape[-1])
        top_vals, top_ids = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())
        chosen_l, vals_l, ids_l = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            n = params[i].logprobs or 0
            top = tuple(zip(ids_l[j][:n], vals_l[j][:n], strict=True))
            out[i] = TokenLogprobs(tokens[i], chosen_l[j], top)
        return tuple(out)
