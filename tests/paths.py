"""Where the tests find the repository and the workspace's shared traces (absent on some machines:
the tests that read them skip there)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: moeinf/, bench/, tests/
SHARED_TRACES = ROOT.parent / "shared" / "traces"
