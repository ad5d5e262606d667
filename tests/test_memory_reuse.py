"""The training process keeps freed memory for the next step (npformer._memory)."""

import platform

import pytest

from npformer import _memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's thresholds exist in glibc only")
def test_glibc_thresholds_are_set_once_and_stay_set():
    assert _memory.keep_freed_memory_for_reuse() is True
    assert _memory.keep_freed_memory_for_reuse() is True  # idempotent: set once per process
