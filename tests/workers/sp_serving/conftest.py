"""SP-serving unit tests: this folder on sys.path so spawned ranks import their entry module."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
