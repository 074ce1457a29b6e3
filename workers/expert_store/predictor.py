"""RoutingPredictor: linear (logistic) probes that forecast each token's experts in later layers.

Sources: the token's embedding (known before the forward starts, source -1) and the MoE input of
layer l (known once layer l routes, source l). For every source s and later layer t there is one
probe W[s,t] [E, D] + b [E] on the RMS-normalised feature; the forecast for layer t uses the latest
source available. Trained by `python -m batonserve.workers.expert_store.train_predictor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from batonserve.workers.expert_store.types import ExpertKey

PREDICTOR_DIR = Path(__file__).parent / "predictors"


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Row-wise RMS normalisation in float32: [T, D] -> [T, D]."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@dataclass
class RoutingPredictor:
    """Probes {(source, target): (W [E, D], b [E])}, float32."""

    num_layers: int
    num_experts: int
    probes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    popularity: torch.Tensor  # [L, E] routed-token counts of the training trace (static policy)

    @staticmethod
    def pairs(num_layers: int) -> list[tuple[int, int]]:
        """Every (source, target) pair: sources -1..L-2, targets after the source."""
        return [(s, t) for s in range(-1, num_layers - 1) for t in range(s + 1, num_layers)]

    def scores(self, source: int, feature: torch.Tensor) -> dict[int, torch.Tensor]:
        """Logits per later layer from `feature` [T, D] at `source`: {target: [T, E]}."""
        w, b = self._stacked(source)  # one matmul for every later layer: [n_t * E, D], [n_t * E]
        logits = torch.addmm(b, normalise(feature), w.T)  # [T, n_t * E]
        targets = range(source + 1, self.num_layers)
        return {
            t: logits[:, i * self.num_experts : (i + 1) * self.num_experts]
            for i, t in enumerate(targets)
        }

    def _stacked(self, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The probes of one source stacked along the output dimension (built once)."""
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = self.__dict__.setdefault("_stack", {})
        if source not in cache:
            pairs = [self.probes[(source, t)] for t in range(source + 1, self.num_layers)]
            cache[source] = (torch.cat([w for w, _ in pairs]), torch.cat([b for _, b in pairs]))
        return cache[source]

    def top_m(self, source: int, feature: torch.Tensor, m: int) -> dict[int, torch.Tensor]:
        """Forecast experts per later layer: {target: [T, m] expert ids}."""
        return {
            t: s.topk(min(m, self.num_experts), dim=-1).indices
            for t, s in self.scores(source, feature).items()
        }

    def forecast_sets(self, source: int, feature: torch.Tensor, m: int) -> dict[int, set[int]]:
        """Union over tokens of each later layer's top-m experts: {target: expert ids}.

        One matmul, one topk and one host copy for every target (this runs before every layer).
        """
        w, b = self._stacked(source)
        logits = torch.addmm(b, normalise(feature), w.T)  # [T, n_t * E]
        n_t = self.num_layers - source - 1
        top = logits.view(-1, n_t, self.num_experts).topk(min(m, self.num_experts), dim=-1)
        ids = top.indices.transpose(0, 1).reshape(n_t, -1).tolist()  # [n_t][T * m]
        return {source + 1 + i: set(row) for i, row in enumerate(ids)}

    def save(self, path: Path) -> None:
        """Write the probes and popularity counts as safetensors."""
        tensors = {"popularity": self.popularity.contiguous()}
        for (s, t), (w, b) in self.probes.items():
            tensors[f"probe.{s}.{t}.weight"] = w.contiguous()
            tensors[f"probe.{s}.{t}.bias"] = b.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu") -> RoutingPredictor:
        """Read a predictor written by `save` onto `device` (where the model's features are)."""
        if not Path(path).is_file():
            raise ValueError(f"predictor: no predictor file at {str(path)!r}")
        tensors = load_file(str(path), device=str(device))
        popularity = tensors.pop("popularity")
        num_layers, num_experts = int(popularity.shape[0]), int(popularity.shape[1])
        probes = {
            (s, t): (tensors[f"probe.{s}.{t}.weight"], tensors[f"probe.{s}.{t}.bias"])
            for s, t in cls.pairs(num_layers)
        }
        return cls(num_layers, num_experts, probes, popularity)

    @property
    def device(self) -> torch.device:
        """Where the probes are."""
        return self.popularity.device

    def popularity_counts(self) -> tuple[tuple[int, ...], ...]:
        """Popularity as nested tuples for PolicyContext."""
        return tuple(tuple(int(v) for v in row) for row in self.popularity.tolist())


def default_predictor_path(model_name: str) -> Path:
    """Where the committed predictor of a bundled model lives."""
    return PREDICTOR_DIR / f"{model_name}.safetensors"


class TokenPaths:
    """A token's forecast routing path from its embedding alone, cached per token id.

    Source -1 probes see only the embedding, so the path is a function of the token id: the
    scheduler asks for it every step (token regrouping) without touching the model.
    """

    def __init__(self, predictor: RoutingPredictor, embed: torch.Tensor, top_m: int = 2) -> None:
        self.predictor = predictor
        self.embed = embed  # [vocab, D]
        self.top_m = top_m
        self._cache: dict[int, frozenset[ExpertKey]] = {}

    def __call__(self, token_id: int) -> frozenset[ExpertKey]:
        """The top-m experts of every MoE layer that `token_id` is forecast to use."""
        path = self._cache.get(token_id)
        if path is None:
            with torch.inference_mode():
                feat = self.embed[token_id : token_id + 1].float().to(self.predictor.device)
                top = self.predictor.top_m(-1, feat, self.top_m)
            path = frozenset(
                ExpertKey(t, int(e)) for t, ids in top.items() for e in ids[0].tolist()
            )
            self._cache[token_id] = path
        return path
