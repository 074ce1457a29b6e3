"""Where routing predictors live: a user cache keyed by the model's identity, never the package.

`batonserve train-predictor --model DIR` writes `<cache>/predictors/<identity>.safetensors`, where
the identity hashes the model's config.json, its weights index and every safetensors header (names,
shapes, dtypes and offsets: a re-trained or re-quantised checkpoint gets a new identity, a copied or
moved one keeps it). The cache is $BATONSERVE_CACHE_DIR, else $XDG_CACHE_HOME/batonserve, else
~/.cache/batonserve. The bundled demo-moe predictor ships in the package and is found by name.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from batonserve.workers.expert_store.predictor import default_predictor_path
from batonserve.workers.models.loader import INDEX_FILE, checkpoint_files
from batonserve.workers.models.paths import BUNDLED_DIR

CACHE_ENV = "BATONSERVE_CACHE_DIR"
TRAIN_COMMAND = "batonserve train-predictor --model"


def cache_dir() -> Path:
    """The user cache root (created on write, not here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "batonserve"


def model_identity(model_dir: Path) -> str:
    """A short hash of config.json, the weights index and each safetensors header."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    index = model_dir / INDEX_FILE
    if index.is_file():
        h.update(index.read_bytes())
    for path in sorted(set(checkpoint_files(model_dir).values())):
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"checkpoint {str(path)!r}: not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            h.update(path.name.encode() + b"\0" + f.read(n))
    return h.hexdigest()[:20]


def predictor_path(model_dir: Path) -> Path:
    """Where `train-predictor` writes (and serving looks for) this model's predictor."""
    return cache_dir() / "predictors" / f"{model_identity(model_dir)}.safetensors"


def find_predictor(model_dir: Path) -> Path | None:
    """The model's predictor: the cached one, else the bundled one of a bundled model, else None."""
    model_dir = Path(model_dir)
    cached = predictor_path(model_dir)
    if cached.is_file():
        return cached
    if model_dir.resolve().parent == BUNDLED_DIR.resolve():
        bundled = default_predictor_path(model_dir.name)
        if bundled.is_file():
            return bundled
    return None


def missing_predictor_message(model_dir: Path) -> str:
    """What to run when a policy needs a predictor that does not exist."""
    return (
        f"no routing predictor trained for model {str(model_dir)!r} (looked in "
        f"{str(predictor_path(model_dir))!r}); train one with: {TRAIN_COMMAND} {model_dir}"
    )
