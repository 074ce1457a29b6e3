"""Test-wide setup: shared helper modules in tests/ are importable from every test folder."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
