"""Test-wide setup: shared helper modules in tests/ are importable from every test folder, and any
Ray the tests start stays on 127.0.0.1 (with `node_ip_address="127.0.0.1"` on every node)."""

import os
import sys
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))
