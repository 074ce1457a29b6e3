"""Helpers shared across test folders, imported as `testkit.<module>`.

tests/conftest.py puts tests/ (not the repository root) on sys.path, and Ray hands the driver's
sys.path to its workers, so helpers passed to Ray actors import there too.
"""

from pathlib import Path

# The working directory for `python -m testkit.<server>` subprocesses: tests/, never the root.
TESTS = Path(__file__).resolve().parents[1]
