"""Device choice and the thread policy: one home each (loratools.compute)."""

from __future__ import annotations

import gc

import pytest
import torch

from loratools.compute import per_item, resolve_device, single_threaded
from loratools.errors import ArgumentError


def test_device_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ArgumentError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="CUDA is not available"):
            resolve_device("cuda")


def test_single_threaded_restores_torch_threads_and_the_gc():
    threads, collecting = torch.get_num_threads(), gc.isenabled()
    with single_threaded(pause_gc=True) as pool:
        assert torch.get_num_threads() == 1 and not gc.isenabled()
        assert list(pool.map(lambda x: x * x, range(5))) == [0, 1, 4, 9, 16]
    assert torch.get_num_threads() == threads and gc.isenabled() == collecting


def test_single_threaded_restores_settings_after_an_error():
    threads = torch.get_num_threads()
    with pytest.raises(ZeroDivisionError), single_threaded(pause_gc=True):
        1 / 0  # noqa: B018
    assert torch.get_num_threads() == threads and gc.isenabled()


def test_per_item_keeps_order():
    assert per_item(lambda x: -x, list(range(20))) == [-x for x in range(20)]
    assert per_item(lambda x: x, []) == []
