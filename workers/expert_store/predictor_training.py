"""Train a routing predictor for any MoE model on a text corpus and put it in the user cache.

Used by `batonserve train-predictor --model DIR`. Routing is recorded by teacher-forced prefills of
token chunks through a runner whose experts come from the tiered store (LRU, no prefetch), so a
model that does not fit in memory can be traced; the store returns the checkpoint's weights, so
the routing is the model's own. The corpus is split into documents (lines holding only "---");
every fifth document is held out and the forecast recall on it is reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.decode import make_batch
from batonserve.workers.expert_store.moe_block import RoutingRecord
from batonserve.workers.expert_store.predictor import RoutingPredictor
from batonserve.workers.expert_store.predictor_cache import predictor_path
from batonserve.workers.expert_store.train_predictor import features, targets, train
from batonserve.workers.model_runner import ModelRunner

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "default.txt"
DOC_SEPARATOR = "---"
HELDOUT_EVERY = 5

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainingReport:
    """What `train_for_model` did: where it wrote, on how many tokens, and held-out recall."""

    path: Path
    train_tokens: int
    heldout_tokens: int
    recall: dict[int, float]  # m -> share of actual routings in the top-m forecast (all pairs)
    recall_next_layer: dict[int, float]  # m -> the same for forecasts one layer ahead only
    seconds: float


def split_documents(text: str) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): every HELDOUT_EVERY-th document is held out."""
    docs, cur = [], []  # type: ignore[var-annotated]
    for line in text.splitlines():
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    docs = [d.strip() for d in docs if d.strip()]
    if len(docs) < 2:
        raise ValueError(
            f"corpus: needs at least 2 documents separated by lines holding only "
            f"{DOC_SEPARATOR!r}, got {len(docs)}"
        )
    held = docs[HELDOUT_EVERY - 1 :: HELDOUT_EVERY] or docs[-1:]
    train_docs = [d for d in docs if d not in held]
    return train_docs, held


def token_chunks(
    tokenizer_json: Path, docs: Sequence[str], length: int, max_chunks: int
) -> list[list[int]]:
    """The documents tokenized, joined (EOS between them when the tokenizer has one), cut into
    chunks of `length` tokens (the last one may be shorter), at most `max_chunks`."""
    if not tokenizer_json.is_file():
        raise ValueError(f"model: no tokenizer.json at {str(tokenizer_json)!r}")
    tok = Tokenizer.from_file(str(tokenizer_json))
    sep: list[int] = []
    for name in ("<|endoftext|>", "</s>", "<|end_of_text|>"):
        eos = tok.token_to_id(name)
        if eos is not None:
            sep = [int(eos)]
            break
    stream: list[int] = []
    for doc in docs:
        stream += tok.encode(doc, add_special_tokens=False).ids + sep
    chunks = [stream[i : i + length] for i in range(0, len(stream), length)]
    return [c for c in chunks if len(c) >= 8][:max_chunks]


def record_routing(
    runner: ModelRunner, chunks: Sequence[Sequence[int]], progress: Progress | None = None
) -> list[RoutingRecord]:
    """Prefill each chunk and return the routing records (ids and predictor features)."""
    ctl = runner.moe_controller
    if ctl is None:
        raise ValueError("model: the runner serves no expert store to record routing from")
    ctl.record = ctl.record_features = True
    ctl.records = []
    blocks = -(-max(len(c) for c in chunks) // runner.block_size)
    for i, chunk in enumerate(chunks):
        runner.execute(make_batch(runner, [list(chunk)], [0], blocks))
        if progress is not None and ((i + 1) % 8 == 0 or i + 1 == len(chunks)):
            progress(f"recorded routing of {i + 1}/{len(chunks)} chunks")
    return ctl.records


def recall(pred: RoutingPredictor, records: list[RoutingRecord], m: int, next_only: bool) -> float:
    """Share of actual (token, expert) routings found in the top-m forecast, pooled over pairs."""
    found = total = 0.0
    for s, t in RoutingPredictor.pairs(pred.num_layers):
        if next_only and t != s + 1:
            continue
        top = pred.top_m(s, features(records, s), m)[t]  # [N, m]
        y = targets(records, t, pred.num_experts)  # [N, E]
        found += float(y.gather(1, top).sum())
        total += float(y.sum())
    return found / total if total else 0.0


def train_for_model(
    model_dir: Path,
    corpus: Path | None = None,
    *,
    seed: int = 0,
    length: int = 128,
    max_chunks: int = 64,
    steps: int = 300,
    device: str = "cpu",
    expert_cache_fraction: float = 0.25,
    out: Path | None = None,
    progress: Progress | None = None,
) -> TrainingReport:
    """Record routing over the corpus, train the probes, report held-out recall, save."""
    t0 = time.time()
    say = progress or (lambda _msg: None)
    path = corpus or DEFAULT_CORPUS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"corpus: cannot read {str(path)!r} ({e})") from e
    train_docs, held_docs = split_documents(text)
    cfg = EngineConfig(
        device=device,
        dtype="auto",
        expert_cache_policy="lru",
        expert_cache_fraction=expert_cache_fraction,
        expert_prefetch=False,
        num_kv_blocks=-(-length // 16) + 1,
        block_size=16,
    )
    say(f"loading {model_dir} on {device} (experts from the store at {expert_cache_fraction:.0%})")
    runner = ModelRunner(model_dir, cfg)
    try:
        if not runner.model_config.is_moe:
            raise ValueError(f"model: {str(model_dir)!r} has no MoE layers; nothing to predict")
        tok_json = runner.tokenizer_path
        train_chunks = token_chunks(tok_json, train_docs, length, max_chunks)
        held_chunks = token_chunks(tok_json, held_docs, length, max(4, max_chunks // 4))
        if not train_chunks or not held_chunks:
            raise ValueError(f"corpus: {str(path)!r} is too short for chunks of {length} tokens")
        say(f"corpus {path.name}: {len(train_docs)} training and {len(held_docs)} held-out docs")
        torch.manual_seed(seed)
        with torch.inference_mode():
            train_recs = record_routing(runner, train_chunks, say)
            held_recs = record_routing(runner, held_chunks, say)
        mc = runner.model_config
    finally:
        runner.close()
    say(f"training {len(RoutingPredictor.pairs(mc.num_layers))} probes ({steps} steps each)")
    pred = train(train_recs, mc.num_layers, mc.num_local_experts, steps, seed=seed, progress=say)
    ms = sorted({mc.num_experts_per_tok, 2 * mc.num_experts_per_tok})
    dest = out or predictor_path(model_dir)
    pred.save(dest)
    return TrainingReport(
        path=dest,
        train_tokens=sum(len(c) for c in train_chunks),
        heldout_tokens=sum(len(c) for c in held_chunks),
        recall={m: recall(pred, held_recs, m, next_only=False) for m in ms},
        recall_next_layer={m: recall(pred, held_recs, m, next_only=True) for m in ms},
        seconds=time.time() - t0,
    )
