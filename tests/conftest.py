import os

# The Triton interpreter must be chosen before any @triton.jit function is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.checkpoints import save_tiny_mixtral  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's real cache directory."""
    monkeypatch.setenv("MOEINF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "moeinf-cache"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A small random Mixtral checkpoint saved by transformers: (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    return folder, save_tiny_mixtral(folder)
