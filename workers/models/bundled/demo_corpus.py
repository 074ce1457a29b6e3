"""Corpus (CPython's stdlib .py files), train/held-out split and byte-level BPE tokenizer."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
HELDOUT_PERCENT = 5  # files whose path hash falls below this go to the held-out split
SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


@dataclass(frozen=True)
class CorpusFile:
    """One source file of the corpus: its path relative to the stdlib root and its text."""

    rel_path: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """The stdlib files split by file into a training and a held-out part."""

    root: Path
    train: tuple[CorpusFile, ...]
    heldout: tuple[CorpusFile, ...]


def is_heldout(rel_path: str) -> bool:
    """Whether a file (by its relative path) belongs to the held-out split (stable hash)."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def load_corpus(root: Path | None = None) -> Corpus:
    """Read every stdlib .py file (no site-packages, no test dirs) in sorted order and split it."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train: list[CorpusFile] = []
    heldout: list[CorpusFile] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS.intersection(rel.split("/")[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        (heldout if is_heldout(rel) else train).append(CorpusFile(rel, text))
    if not train or not heldout:
        raise ValueError(f"corpus: no Python files found under {str(root)!r}")
    return Corpus(root, tuple(train), tuple(heldout))


def train_tokenizer(corpus: Corpus) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the training files only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],  # id 0: separates files; used as bos and eos
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.text for f in corpus.train), trainer=trainer)
    assert tok.token_to_id(EOS) == 0
    # every training file starts after an EOS, so encoded prompts start with it too (as bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, 0)]
    )
    return tok


# A plain chat format (Python comments, the corpus's own idiom) so OpenAI chat requests work.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '# ' + message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '# assistant: ' }}{% endif %}"
)


def write_tokenizer_files(tok: Tokenizer, out_dir: Path, max_len: int) -> None:
    """Write tokenizer.json and tokenizer_config.json so transformers' AutoTokenizer loads them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": None,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def token_stream(tok: Tokenizer, files: tuple[CorpusFile, ...]) -> torch.Tensor:
    """Concatenate the files as `<eos> file <eos> file ...` into one 1-D int64 tensor."""
    eos = tok.token_to_id(EOS)
    assert eos is not None
    ids: list[int] = []
    for enc in tok.encode_batch([f.text for f in files], add_special_tokens=False):
        ids.append(eos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)
