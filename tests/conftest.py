"""Test-wide setup: the shared helper package `testkit` (tests/testkit/) is importable from every
test folder and from Ray workers, the repository root is not, and any Ray the tests start stays
on 127.0.0.1 (with `node_ip_address="127.0.0.1"` on every node)."""

import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# `python -m pytest` from the repository root puts the root first on sys.path, and Ray copies the
# driver's sys.path into its workers. There `kernels/`, `cluster/`, `workers/` and `proto/` would
# shadow the PyPI distributions of those names (transformers imports Hugging Face's `kernels`);
# the project itself is imported only as `batonserve.*`, so the root never needs to be there.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO]
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(TESTS))  # tests/ only: `import testkit.<helper>`
