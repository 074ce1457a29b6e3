"""Resolve a model argument: a bundled demo name or a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_NAMES = ("demo", "demo-moe")


def resolve_model_dir(model: str | Path) -> Path:
    """Return the directory holding config.json for `model`, or raise ValueError naming it."""
    path = BUNDLED_DIR / str(model) if str(model) in BUNDLED_NAMES else Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model: unknown model directory {str(model)!r} "
            f"(give a Hugging Face model directory or one of {list(BUNDLED_NAMES)})"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model: {str(path)!r} has no config.json; not a Hugging Face model directory"
        )
    return path
