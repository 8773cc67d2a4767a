"""Spectra from the factors, with hand-checked singular values, and the optional plot."""

from __future__ import annotations

import sys

import pytest
import torch

from loratools.adapter import Adapter, LoraModule
from loratools.errors import DependencyError, OutputExistsError
from loratools.ops.spectrum import plot_spectrum, spectra

# ΔW = s·B·A with B = [[3, 0], [0, 1], [0, 0]], A = I (2 x 2), s = alpha/r = 2: singular values 6 and 2
MODULE = LoraModule(torch.eye(2), torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), alpha=4.0)
ADAPTER = Adapter({"m": MODULE}, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["m"]})


def test_singular_values_and_ranks_for_energy():
    (s,) = spectra(ADAPTER)
    assert s.module == "m" and s.rank == 2
    assert s.singular_values == pytest.approx((6.0, 2.0), abs=1e-6)
    # energies 36/40 = 0.9 and 1.0: 90% needs rank 1, 99% rank 2
    assert s.rank_for(0.9) == 1 and s.rank_for(0.99) == 2
    assert s.to_dict()["rank_for_energy"] == {"0.9": 1, "0.99": 2, "0.999": 2}


def test_plot_writes_a_png_and_refuses_to_overwrite(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_spectrum(spectra(ADAPTER), tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputExistsError):
        plot_spectrum(spectra(ADAPTER), tmp_path / "s.png")


def test_missing_matplotlib_is_a_dependency_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(DependencyError, match=r"pip install 'loratools\[plot\]'"):
        plot_spectrum(spectra(ADAPTER), tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
