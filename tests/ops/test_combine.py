"""add with a merge method: equals PEFT 0.21's add_weighted_adapter *_svd at full rank, no worse at lower ranks; refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

from loratools import ArgumentError, SpecError, load
from loratools.adapter import LoraModule
from loratools.methods import get_method, module_generator
from loratools.ops.arith import add
from loratools.ops.combine import combine

from ..factories import dense, make_adapter, random_module


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # every ΔW has min(m, n) = 8, so PEFT's one svd_rank 8 truncates none (above it PEFT cannot reshape conv factors)
        self.q = torch.nn.Linear(10, 8)
        self.v = torch.nn.Linear(8, 11)
        self.conv = torch.nn.Conv2d(3, 8, 3)


def _peft_pair(tmp_path):
    """A PeftModel holding adapters "a" (r 4, alpha 8) and "b" (r 3, alpha 3, rsLoRA), both saved to disk too."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(11)
        targets = ["q", "v", "conv"]
        model = peft.get_peft_model(_Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False), "a")
        model.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=3, use_rslora=True, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(tmp_path)
    return model, load(tmp_path / "a"), load(tmp_path / "b")


def _peft_delta(model, combination: str, rank: int, density: float, name: str) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(
            ["a", "b"],
            [0.8, -0.6],
            name,
            combination_type=combination,
            svd_rank=rank,
            density=density,
            majority_sign_method="total",
            svd_full_matrices=False,  # PEFT's default (True) cannot form U·diag(S) when svd_rank exceeds min(m, n)
        )
    return {n: model.base_model.model.get_submodule(n).get_delta_weight(name).reshape(rows, -1).double() for n, rows in _ROWS.items()}


_ROWS = {"q": 8, "v": 11, "conv": 8}


@pytest.mark.parametrize(("method", "combination"), [("ties", "ties_svd"), ("magnitude_prune", "magnitude_prune_svd")])
def test_full_rank_equals_peft_and_lower_ranks_are_no_worse(tmp_path, method, combination):
    model, a, b = _peft_pair(tmp_path)
    exact = _peft_delta(model, combination, 8, 0.4, "full")
    ours, rows = combine(a, b, method=method, weights=[0.8, -0.6], density=0.4, rank="full")
    for name, want in exact.items():
        torch.testing.assert_close(dense(ours.modules[name]), want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert {r.module: (r.old_rank, r.new_rank) for r in rows} == {"q": (7, 8), "v": (7, 8), "conv": (7, 8)}
    assert all(r.rel_error < 1e-6 for r in rows)
    peft_low = _peft_delta(model, combination, 2, 0.4, "low")
    low, rows = combine(a, b, method=method, weights=[0.8, -0.6], density=0.4, rank=2)
    for name, want in exact.items():
        err, peft_err = float((dense(low.modules[name]) - want).norm()), float((peft_low[name] - want).norm())
        assert err <= peft_err * (1 + 1e-5) + 1e-7
        row = next(r for r in rows if r.module == name)
        assert row.new_rank == 2 and row.rel_error == pytest.approx(err / float(want.norm()), rel=1e-3)


def test_energy_and_max_rel_error_pick_per_module_ranks():
    a = make_adapter({"q": random_module(9, 7, 3, seed=1)})
    b = make_adapter({"q": random_module(9, 7, 3, seed=2)})
    _, rows = combine(a, b, method="ties", density=0.5, max_rel_error=0.2)
    assert rows[0].rel_error <= 0.2 and rows[0].new_rank < 7
    _, rows = combine(a, b, method="ties", density=0.5, energy=1.0)
    assert rows[0].new_rank == 7


def test_task_arithmetic_is_todays_exact_factored_sum():
    a, b = make_adapter({"q": random_module(seed=1)}), make_adapter({"q": random_module(seed=2)})
    ours, rows = combine(a, b, method="task_arithmetic", weights=[0.5, 2.0])
    assert rows == [] and torch.equal(ours.modules["q"].B, add(a, b, weights=[0.5, 2.0]).modules["q"].B)


def test_dare_is_reproducible_under_a_seed():
    a, b = make_adapter({"q": random_module(seed=1)}), make_adapter({"q": random_module(seed=2)})
    one, _ = combine(a, b, method="dare", density=0.5, seed=3, rank="full")
    two, _ = combine(a, b, method="dare", density=0.5, seed=3, rank="full")
    other, _ = combine(a, b, method="dare", density=0.5, seed=4, rank="full")
    assert torch.equal(dense(one.modules["q"]), dense(two.modules["q"]))
    assert not torch.equal(dense(one.modules["q"]), dense(other.modules["q"]))


def test_della_at_full_rank_is_the_method_on_the_dense_deltas():
    # add --method della --rank full: the SVD gives back della(ΔW_a, ΔW_b) seeded by (seed, module name)
    a, b = make_adapter({"q": random_module(seed=1)}), make_adapter({"q": random_module(seed=2)})
    ours, _ = combine(a, b, method="della", density=0.5, epsilon=0.2, seed=3, weights=[1.0, 0.5], rank="full")
    method = get_method("della")
    deltas = [dense(x.modules["q"]).float() for x in (a, b)]
    expected = method.combine(deltas, [1.0, 0.5], method.options(density=0.5, epsilon=0.2, seed=3), module_generator(3, "q"))
    assert torch.allclose(dense(ours.modules["q"]).float(), expected, atol=1e-5)


def test_progress_counts_every_module_once():
    a = make_adapter({n: random_module(seed=i) for i, n in enumerate("qkv")})
    b = make_adapter({n: random_module(seed=5 + i) for i, n in enumerate("qk")})
    calls = []
    combine(a, b, method="ties", density=0.5, rank=2, progress=lambda done, total: calls.append((done, total)))
    assert sorted(calls) == [(1, 3), (2, 3), (3, 3)]


def test_undefined_combinations_are_refused():
    a, b = make_adapter({"q": random_module(seed=1)}), make_adapter({"q": random_module(seed=2)})
    with pytest.raises(ArgumentError, match="give --rank"):
        combine(a, b, method="ties", density=0.5)
    with pytest.raises(ArgumentError, match="task_arithmetic has no density"):
        combine(a, b, method="task_arithmetic", density=0.5)
    with pytest.raises(ArgumentError, match="ties has no epsilon"):
        combine(a, b, method="ties", density=0.5, epsilon=0.1, rank=2)
    with pytest.raises(ArgumentError, match=r"density must be in \(0, 1\]"):
        combine(a, b, method="dare", density=0.0, rank=2)  # PEFT's dare gives NaN there (peft#3530)
    dora = make_adapter({"q": LoraModule(torch.ones(2, 5), torch.ones(6, 2), 2.0, magnitude=torch.ones(6))})
    with pytest.raises(SpecError, match="input 2 is a DoRA adapter"):
        combine(a, dora, method="ties", density=0.5, rank=2)
    biased = make_adapter({"q": LoraModule(torch.ones(2, 5), torch.ones(6, 2), 2.0, bias=torch.ones(6))})
    with pytest.raises(SpecError, match="lora_bias at q"):
        combine(a, biased, method="ties", density=0.5, rank=2)
