"""Sampler: greedy, top-k/top-p masks, seeded rows independent of the batch, logprobs."""

from __future__ import annotations

import math

import torch

from batonserve.workers.sampler import Sampler, apply_top_k_top_p, seeded_uniform
from batonserve.workers.sampling_params import SamplingParams

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_top_k_keeps_exactly_k_largest() -> None:
    x = _logits(3)
    out = apply_top_k_top_p(x, torch.tensor([1, 5, 0]), torch.ones(3))
    kept = torch.isfinite(out)
    assert kept.sum(dim=1).tolist() == [1, 5, V]
    for i, k in enumerate([1, 5]):
        assert set(kept[i].nonzero().flatten().tolist()) == set(x[i].topk(k).indices.tolist())
    assert torch.equal(out[2], x[2])


def test_top_p_keeps_smallest_nucleus() -> None:
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(x, torch.zeros(2, dtype=torch.long), torch.tensor([0.5, 0.81]))
    assert torch.isfinite(out).tolist() == [
        [True, False, False, False],  # 0.5 alone reaches 0.5
        [True, True, True, False],  # 0.5 + 0.3 = 0.8 < 0.81: needs the third
    ]


def test_greedy_is_argmax_and_sampling_respects_masks() -> None:
    s = Sampler(seed=1)
    x = _logits(4)
    greedy = SamplingParams(temperature=0.0)
    out = s.sample(x, [greedy] * 4)
    assert list(out.token_ids) == x.argmax(dim=1).tolist()
    topk2 = SamplingParams(temperature=5.0, top_k=2)
    allowed = set(x[0].topk(2).indices.tolist())
    for _ in range(30):
        (t,) = s.sample(x[:1], [topk2]).token_ids
        assert t in allowed


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123)
    x = _logits(6, seed=3)
    alone = Sampler(seed=0).sample(x[2:3], [p], [40]).token_ids[0]
    others = [SamplingParams(temperature=0.7, top_k=5)] * 5
    params = [*others[:2], p, *others[2:]]
    in_batch = Sampler(seed=99).sample(x, params, [7, 8, 40, 9, 10, 11]).token_ids[2]
    assert alone == in_batch
    # Position by position the same seed yields the same sequence, whatever the batch.
    s = Sampler()
    seq1 = [s.sample(x[:1], [p], [i]).token_ids[0] for i in range(20)]
    mixed = torch.stack([x[1], x[0], x[2]])
    seq2 = [s.sample(mixed, [others[0], p, others[1]], [0, i, 0]).token_ids[1] for i in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_seeded_uniform_is_a_pure_function_and_roughly_uniform() -> None:
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    pos = torch.tensor([5, 6, 5], dtype=torch.int64)
    u = seeded_uniform(seeds, pos, 4000)
    assert u.shape == (3, 4000) and u.dtype == torch.float32
    assert torch.equal(u, seeded_uniform(seeds, pos, 4000))
    assert bool(((u > 0) & (u < 1)).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # position and seed count
    assert abs(float(u.mean()) - 0.5) < 0.02
    hist = torch.histc(u[0], bins=10, min=0.0, max=1.0)
    assert bool((hist > 300).all())  # ~400 per bin


def test_sampling_frequencies_follow_softmax() -> None:
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    s = Sampler(seed=5)
    p = SamplingParams(temperature=1.0)
    counts = [0, 0, 0]
    for _ in range(600):
        counts[s.sample(x, [p]).token_ids[0]] += 1
    assert abs(counts[0] / 600 - 0.6) < 0.08 and abs(counts[2] / 600 - 0.1) < 0.05


def test_logprobs_top_n() -> None:
    x = _logits(2)
    out = Sampler().sample(
        x,
        [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)],
    )
    lp = out.logprobs[0]
    assert lp is not None and out.logprobs[1] is None
    ref = x[0].log_softmax(-1)
    assert lp.token_id == out.token_ids[0]
    assert math.isclose(lp.logprob, float(ref.max()), abs_tol=1e-6)
    assert [t for t, _ in lp.top] == ref.topk(3).indices.tolist()


def test_seeded_sampling_frequencies_follow_softmax() -> None:
    """Over positions, a seeded row's draws follow its distribution."""
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = SamplingParams(temperature=1.0, seed=11)
    s = Sampler()
    counts = [0, 0, 0]
    for i in range(600):
        counts[s.sample(x, [p], [i]).token_ids[0]] += 1
    assert abs(counts[0] / 600 - 0.6) < 0.08 and abs(counts[2] / 600 - 0.1) < 0.05


def test_mixed_logprobs_counts_and_random_rows_in_one_call() -> None:
    x = _logits(3, seed=4)
    params = [
        SamplingParams(temperature=0.8, logprobs=1, seed=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    out = Sampler().sample(x, params, [3, 4, 5])
    a, b, c = out.logprobs
    assert a is not None and b is not None and c is None
    assert len(a.top) == 1 and b.top == () and b.token_id == int(x[1].argmax())
    lp = x.log_softmax(-1)
    assert math.isclose(a.logprob, float(lp[0, out.token_ids[0]]), abs_tol=1e-6)
