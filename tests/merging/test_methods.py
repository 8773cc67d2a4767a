"""merge --method: streamed into the base tensor by tensor, equal bit for bit to base + method(ΔWᵢ) by the papers' formulas.

The reference is PEFT 0.21's merge_utils (the TIES/DARE papers' formulas) applied to each adapter's
whole float32 ΔW; tests/merging/test_mergekit.py compares with mergekit's merges of full models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from loratools import ArgumentError, SpecError, merge
from loratools.adapter import LoraModule
from loratools.cli import main
from loratools.merging.kernels import BLOCK
from loratools.methods import get_method, module_generator
from loratools.ops.combine import combine

from ..factories import make_adapter, random_module

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (1024, 600), V: (40, 600)}  # q spans several float32 row blocks: streaming must not change TIES's trim


def _base(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {f"{name}.weight": torch.randn(*shape, generator=g) for name, shape in SHAPES.items()}
    tensors["model.norm.weight"] = torch.ones(600)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def _adapters():
    return [
        make_adapter({n: random_module(*s, rank=16, alpha=8.0 * (i + 1), seed=10 * i + j) for j, (n, s) in enumerate(SHAPES.items())})
        for i in range(3)
    ]


def _dense(m: LoraModule) -> torch.Tensor:
    return (m.B.float() @ m.A.float()) * m.scale  # the order PEFT and the merge kernels use: (B·A)·s


@pytest.mark.parametrize(("method", "sign"), [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", None)])
def test_merge_with_a_method_is_bit_identical_to_the_reference(tmp_path, method, sign):
    assert SHAPES[Q][0] > BLOCK // SHAPES[Q][1]  # two row blocks at least
    base, adapters, weights = _base(tmp_path), _adapters(), [0.7, -0.5, 1.2]
    merge(base, adapters, weights=weights, out=tmp_path / "out.safetensors", method=method, density=0.3, majority_sign=sign)
    got, w0 = load_file(str(tmp_path / "out.safetensors")), load_file(str(base))
    for name in SHAPES:
        deltas = [_dense(a.modules[name]) for a in adapters]
        if method == "ties":
            delta = merge_utils.ties(deltas, torch.tensor(weights), 0.3, sign)
        else:
            delta = merge_utils.magnitude_prune(deltas, torch.tensor(weights), 0.3)
        assert torch.equal(got[f"{name}.weight"], w0[f"{name}.weight"] + delta), name
    assert torch.equal(got["model.norm.weight"], w0["model.norm.weight"])


def test_task_arithmetic_is_todays_merge(tmp_path):
    base, adapters = _base(tmp_path), _adapters()[:2]
    merge(base, adapters, out=tmp_path / "a.safetensors")
    merge(base, adapters, out=tmp_path / "b.safetensors", method="task_arithmetic")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_dare_merge_is_reproducible_under_a_seed(tmp_path):
    base, adapters = _base(tmp_path), _adapters()[:2]
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        merge(base, adapters, out=tmp_path / f"{name}.safetensors", method="dare_ties", density=0.5, seed=seed)
    a, b, c = (load_file(str(tmp_path / f"{n}.safetensors"))[f"{Q}.weight"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_undefined_combinations_are_refused_before_writing(tmp_path):
    base = _base(tmp_path)
    dora = make_adapter({V: LoraModule(torch.ones(2, 600), torch.ones(40, 2), 2.0, magnitude=torch.ones(40))})
    with pytest.raises(SpecError, match="DoRA modules cannot be merged with method ties"):
        merge(base, [make_adapter({Q: _adapters()[0].modules[Q]}), dora], out=tmp_path / "x.safetensors", method="ties", density=0.5)
    with pytest.raises(ArgumentError, match="task_arithmetic has no density"):
        merge(base, _adapters()[:1], out=tmp_path / "x.safetensors", density=0.5)
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_merge_method_reports_json(tmp_path):
    from loratools import save

    base = _base(tmp_path)
    paths = [save(a, tmp_path / f"ad{i}") for i, a in enumerate(_adapters()[:2])]
    args = ["merge", str(base), *map(str, paths), "--method", "ties", "--density", "0.5", "-o", str(tmp_path / "m.safetensors"), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["merged"] == len(SHAPES)
    assert report["method"] == {"name": "ties", "density": 0.5, "majority_sign": "total"}


@pytest.mark.parametrize(("method", "epsilon"), [("dare_ties", None), ("della", 0.2), ("della_linear", 0.1)])
def test_random_methods_merge_as_the_whole_tensor_method_with_the_tensors_seed(tmp_path, method, epsilon):
    # row blocks join slices of what each input keeps, drawn once per whole tensor from (seed, module name)
    base, adapters, weights = _base(tmp_path), _adapters(), [0.7, -0.5, 1.2]
    out = tmp_path / "out.safetensors"
    merge(base, adapters, weights=weights, out=out, method=method, density=0.4, epsilon=epsilon, seed=9)
    got, w0 = load_file(str(out)), load_file(str(base))
    chosen = get_method(method)
    options = chosen.options(density=0.4, seed=9, epsilon=epsilon)
    for name in SHAPES:
        key = f"{name}.weight"
        delta = chosen.combine([_dense(a.modules[name]) for a in adapters], weights, options, module_generator(9, name))
        assert torch.equal(got[key], w0[key] + delta), name


@pytest.mark.parametrize("method", ["dare", "della"])
def test_add_and_merge_drop_the_same_entries_under_one_seed(tmp_path, method):
    # both seed a module's drops by (seed, module name): add at full rank gives merge's ΔW per module
    base, adapters, weights = _base(tmp_path), _adapters()[:2], [0.7, 1.2]
    out = tmp_path / "out.safetensors"
    merge(base, adapters, weights=weights, out=out, method=method, density=0.4, seed=3)
    added, _ = combine(*adapters, method=method, weights=weights, density=0.4, seed=3, rank="full")
    other, _ = combine(*adapters, method=method, weights=weights, density=0.4, seed=4, rank="full")
    got, w0 = load_file(str(out)), load_file(str(base))
    for name in SHAPES:
        merged = got[f"{name}.weight"] - w0[f"{name}.weight"]
        same, differs = (_dense(a.modules[name]) for a in (added, other))
        tol = 1e-5 * float(merged.abs().max()) + 4 * float(w0[f"{name}.weight"].abs().max()) * torch.finfo(torch.float32).eps
        assert float((same - merged).abs().max()) <= tol, name
        assert float((differs - merged).abs().max()) > 100 * tol, name
