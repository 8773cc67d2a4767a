"""merge --method against mergekit 0.1.5's merges of the full models base + ΔWᵢ (run in process, offline, on CPU).

The full models are a tiny Llama built from a config, every weight on a grid of 2⁻¹² (|w| < 2¹¹), and
each adapter's ΔWᵢ = s·B·A is on the same grid with distinct magnitudes (A = I at rank 16, s = 1),
so W + ΔWᵢ is exact in float32 and mergekit's delta (W + ΔWᵢ) − W is exactly our ΔWᵢ: what is
compared is the methods, not rounding.  The mapping (mergekit's sources, merge_methods/registry.py
and generalized_task_arithmetic.py):

* ``ties`` = mergekit ``ties`` with every weight 1.  mergekit elects the sign on the *weighted*
  deltas and divides by the sum of the agreeing weights; PEFT (and we) elect on the unweighted ones
  and divide by their count.  With weights 1 both are the same arithmetic.
* ``magnitude_prune`` = mergekit ``breadcrumbs`` with gamma 0 (its magnitude_outliers then drops
  only the smallest, keeping k = ⌊density·n⌋ as PEFT does) and any weights: Σ wᵢ·trim(ΔWᵢ).
  (mergekit's own ``magnitude`` sparsifier keeps max(1, k), the same unless density·n < 1.)
* DARE, DELLA: random on both sides (and mergekit rescales DARE/DELLA to the L1 norm rather than
  by 1/p), so not compared bit for bit; tests/methods checks their statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools import merge, save
from loratools.adapter import LoraModule

from ..conftest import tiny_llama
from ..factories import make_adapter

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402

GRID = 2.0**-12
TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _on_grid(t: torch.Tensor) -> torch.Tensor:
    return (t / GRID).round().clamp(-2000, 2000) * GRID + 0.0  # + 0.0: no -0.0 entries


def _delta(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Distinct magnitudes 1..n (times the grid), shuffled, with random signs: no ties for any density."""
    n = shape[0] * shape[1]
    magnitudes = (torch.randperm(n, generator=gen) + 1).float()
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return (magnitudes * signs * GRID).reshape(shape)


def _models(tmp_path: Path, count: int):
    """The base directory; per adapter its saved LoRA and the full model base + ΔWᵢ."""
    model = tiny_llama(seed=0)
    state = {k: _on_grid(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    base = tmp_path / "base"
    model.save_pretrained(base)
    gen = torch.Generator().manual_seed(4)
    adapters, fulls = [], []
    for i in range(count):
        modules, full = {}, dict(state)
        for layer in range(2):
            for target in TARGETS:
                name = f"model.layers.{layer}.{target}"
                W = state[f"{name}.weight"]
                delta = _delta(tuple(W.shape), gen)
                rank = W.shape[1]
                modules[name] = LoraModule(torch.eye(rank), delta, float(rank))  # s = alpha / r = 1: ΔW = B·I = delta
                full[f"{name}.weight"] = W + delta
        adapters.append(save(make_adapter(modules), tmp_path / f"adapter{i}"))
        model.load_state_dict(full)
        model.save_pretrained(tmp_path / f"full{i}")
        fulls.append(tmp_path / f"full{i}")
    return base, adapters, fulls


def _mergekit(method: str, base: Path, fulls: list[Path], weights: list[float], density: float, out: Path, **extra) -> dict:
    models = [{"model": str(f), "parameters": {"weight": w, "density": density, **extra}} for f, w in zip(fulls, weights, strict=True)]
    config = MergeConfiguration.model_validate({"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_ties_equals_mergekit_ties_with_weights_one(tmp_path, density):
    base, adapters, fulls = _models(tmp_path, 3)
    theirs = _mergekit("ties", base, fulls, [1.0, 1.0, 1.0], density, tmp_path / "mk")
    merge(base, adapters, out=tmp_path / "ours", method="ties", density=density)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs)
    changed = 0
    for key, tensor in ours.items():
        assert torch.equal(tensor.view(torch.int32), theirs[key].view(torch.int32)), key  # bit for bit
        changed += not torch.equal(tensor, load_file(str(base / "model.safetensors"))[key])
    assert changed == 2 * len(TARGETS)


@pytest.mark.parametrize(("density", "weights"), [(0.25, [0.75, -0.5]), (0.6, [1.0, 2.0])])
def test_magnitude_prune_equals_mergekit_breadcrumbs_without_outliers(tmp_path, density, weights):
    base, adapters, fulls = _models(tmp_path, 2)
    theirs = _mergekit("breadcrumbs", base, fulls, weights, density, tmp_path / "mk", gamma=0.0)
    merge(base, adapters, weights=weights, out=tmp_path / "ours", method="magnitude_prune", density=density)
    ours = load_file(str(tmp_path / "ours" / "model.safetensors"))
    for key, tensor in ours.items():
        assert torch.equal(tensor.view(torch.int32), theirs[key].view(torch.int32)), key
