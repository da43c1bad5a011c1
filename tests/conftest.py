"""Shared fixtures. The zoo cache defaults to .cache/moelab in the repository, so the smoke model is
built once (about a minute) and reused by every later test run; MOELAB_CACHE overrides it."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MOELAB_CACHE", str(ROOT / ".cache" / "moelab"))
# Two cores: keep torch from oversubscribing them when tests run beside other work.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Seed torch and use one intra-op thread: on a busy 2-core machine tiny models run faster that way."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke():
    """The smoke zoo model and its tokenizer (built on first use)."""
    from moelab import zoo

    return zoo.load("smoke")
