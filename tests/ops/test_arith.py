"""add/scale/subtract/resize against dense float64 references, hand-worked cases and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools import ArgumentError, ShapeError, SpecError, load, save
from loratools.adapter import LoraModule
from loratools.linalg import singular_values
from loratools.ops.arith import add, resize, scale, subtract

from ..factories import dense, make_adapter, random_module

SETTINGS = settings(max_examples=30, deadline=None)
Q, V, K = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.k_proj"

# one random module per draw: rank, alpha, rsLoRA and seed vary; ΔW is always 6 x 5
modules = st.builds(
    lambda r, alpha, rs, seed: random_module(6, 5, r, alpha=alpha, rslora=rs, seed=seed),
    st.integers(1, 7),
    st.sampled_from([1.0, 4.0, 16.0, 0.5]),
    st.booleans(),
    st.integers(0, 10_000),
)
weights = st.floats(-3, 3, allow_nan=False)


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 1e-5) -> None:
    scale_ = max(float(y.abs().max()), 1.0)
    torch.testing.assert_close(x.double(), y.double(), rtol=0, atol=tol * scale_)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 4))
def test_add_equals_the_dense_weighted_sum(data, n):
    inputs = []
    for _ in range(n):
        names = data.draw(st.lists(st.sampled_from([Q, V, K]), min_size=1, max_size=3, unique=True))
        inputs.append(make_adapter({name: data.draw(modules) for name in names}))
    w = data.draw(st.lists(weights, min_size=n, max_size=n))
    out = add(*inputs, weights=w)
    assert set(out.modules) == {name for a in inputs for name in a.modules}
    for name, m in out.modules.items():
        want = sum(wi * dense(a.modules[name]) for a, wi in zip(inputs, w, strict=True) if name in a.modules)
        close(dense(m), want)
        assert m.rank == sum(a.modules[name].rank for a in inputs if name in a.modules)
        assert m.scale == 1.0 and not m.rslora


def test_add_is_exact_where_concatenating_summed_factors_is_not():
    # ΔW₁ = e₁e₁ᵀ, ΔW₂ = e₂e₂ᵀ (scale 1): the sum is I; (B₁+B₂)(A₁+A₂) would be all ones.
    e1, e2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    a = make_adapter({Q: LoraModule(e1.T, e1, 1.0)})
    b = make_adapter({Q: LoraModule(e2.T, e2, 1.0)})
    assert dense(add(a, b).modules[Q]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


@SETTINGS
@given(m=modules, x=weights, y=weights)
def test_scale_composes(m, x, y):
    a = make_adapter({Q: m})
    close(dense(scale(scale(a, x), y).modules[Q]), dense(scale(a, x * y).modules[Q]))
    close(dense(scale(a, x).modules[Q]), x * dense(m))


def test_scale_by_a_negative_factor_by_hand():
    a = make_adapter({Q: LoraModule(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0]]), alpha=2.0)})  # s = 2: ΔW = [[4, 8]]
    m = scale(a, -0.5).modules[Q]
    assert dense(m).tolist() == [[-2.0, -4.0]]
    assert (m.rank, m.alpha) == (1, 1.0)


@SETTINGS
@given(a=modules, b=modules)
def test_subtract_is_the_dense_difference(a, b):
    out = subtract(make_adapter({Q: a}), make_adapter({Q: b}))
    close(dense(out.modules[Q]), dense(a) - dense(b))


@SETTINGS
@given(m=modules)
def test_full_rank_resize_is_lossless(m):
    out, rows = resize(make_adapter({Q: m}), m.rank)
    close(dense(out.modules[Q]), dense(m))
    assert rows[0].new_rank == min(m.rank, 5) and rows[0].rel_error < 1e-6
    assert rows[0].kept_energy == pytest.approx(1.0)


@SETTINGS
@given(m=modules, k=st.integers(1, 4))
def test_resize_error_equals_the_tail_singular_values(m, k):
    out, rows = resize(make_adapter({Q: m}), k)
    S = torch.linalg.svdvals(dense(m))
    k = min(k, m.rank, 5)
    tail = float(S[k:].square().sum().sqrt())
    err = float(torch.linalg.matrix_norm(dense(out.modules[Q]) - dense(m)))
    assert err == pytest.approx(tail, abs=1e-5 * float(S[0]))
    assert rows[0].rel_error == pytest.approx(tail / float(S.square().sum().sqrt()), abs=1e-6)
    assert rows[0].kept_energy == pytest.approx(float(S[:k].square().sum() / S.square().sum()), abs=1e-6)


def _meets(S: torch.Tensor, k: int, criterion: str, value: float) -> bool:
    """Dense-side check of one criterion for rank k, from the dense singular values S."""
    sq = S.square()
    if criterion == "energy":
        return float(sq[:k].sum() / sq.sum()) >= value - 1e-6
    if criterion == "max_rel_error":
        return float((sq[k:].sum() / sq.sum()).sqrt()) <= value + 1e-6
    return k == len(S) or float(S[k]) < float(S[0]) / value * (1 + 1e-6)  # sv_ratio: nothing large left out


@SETTINGS
@given(m=modules, criterion=st.sampled_from(["energy", "max_rel_error", "sv_ratio"]), u=st.floats(0.05, 0.95))
def test_dynamic_criteria_keep_the_smallest_sufficient_rank(m, criterion, u):
    value = {"energy": u, "max_rel_error": u / 2, "sv_ratio": 1 + 20 * u}[criterion]
    out, rows = resize(make_adapter({Q: m}), **{criterion: value})
    S = torch.linalg.svdvals(dense(m))[: min(m.rank, 5)]
    k = rows[0].new_rank
    assert out.modules[Q].rank == k
    assert _meets(S, k, criterion, value)
    if criterion != "sv_ratio":
        stricter = value + 2e-6 if criterion == "energy" else value - 2e-6  # k - 1 must miss by more than round-off
        assert k == 1 or not _meets(S, k - 1, criterion, stricter)
    else:
        assert float(S[k - 1]) >= float(S[0]) / value * (1 - 1e-6)  # every kept σ is large enough


def test_resize_splits_sqrt_sigma_into_each_factor():
    m = random_module(8, 7, 4, alpha=4.0, seed=3)
    out = resize(make_adapter({Q: m}), 3)[0].modules[Q]
    root = singular_values(m.B, m.A, m.scale)[:3].sqrt().float()
    torch.testing.assert_close(torch.linalg.vector_norm(out.B, dim=0), root, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.linalg.vector_norm(out.A, dim=1), root, rtol=1e-5, atol=1e-6)


def test_per_module_ranks_get_anchored_patterns(tmp_path):
    # q has σ = (2, 1, 0.001) -> energy 0.99 keeps 2; v is rank one -> keeps 1.
    q = LoraModule(torch.eye(3, 4), torch.diag(torch.tensor([2.0, 1.0, 0.001])), alpha=3.0)
    v = LoraModule(torch.ones(3, 4), torch.ones(4, 3), alpha=3.0)
    out, rows = resize(make_adapter({Q: q, V: v}, rank_pattern={"v_proj": 3}), energy=0.99)
    assert [(r.module, r.old_rank, r.new_rank) for r in rows] == [(Q, 3, 2), (V, 3, 1)]
    config = out.peft_config()
    assert {config["r"], *config["rank_pattern"].values()} == {1, 2}
    assert config["alpha_pattern"] == config["rank_pattern"] and config["use_rslora"] is False
    back = load(save(out, tmp_path / "out"))
    assert {n: m.rank for n, m in back.modules.items()} == {Q: 2, V: 1}
    close(dense(back.modules[Q]), dense(out.modules[Q]))


def test_conv_and_embedding_modules_keep_their_layout():
    conv = random_module(6, 3, 4, kernel=(3, 3), seed=1)
    emb = random_module(16, 20, 4, kind="embedding", seed=2)
    a = make_adapter({"unet.conv": conv, "model.embed_tokens": emb})
    total = add(a, a, weights=[1.0, 0.5])
    assert total.modules["unet.conv"].A.shape == (8, 3, 3, 3) and total.modules["unet.conv"].B.shape == (6, 8, 1, 1)
    assert total.modules["model.embed_tokens"].kind == "embedding"
    close(dense(total.modules["unet.conv"]), 1.5 * dense(conv))
    small, _ = resize(total, 2)
    assert small.modules["unet.conv"].A.shape == (2, 3, 3, 3) and small.modules["unet.conv"].B.shape == (6, 2, 1, 1)
    assert small.modules["model.embed_tokens"].A.shape == (2, 20)
    full, _ = resize(total, 8)
    close(dense(full.modules["model.embed_tokens"]), 1.5 * dense(emb))


def test_lora_bias_is_scaled_with_its_module():
    m = LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=2.0, bias=torch.tensor([1.0, 2.0, 3.0]))  # s = 2
    n = LoraModule(torch.ones(1, 2), torch.ones(3, 1), alpha=1.0)
    out = add(make_adapter({Q: m}), make_adapter({Q: n}), weights=[0.5, 1.0])
    assert out.modules[Q].bias.tolist() == [1.0, 2.0, 3.0]
    assert resize(make_adapter({Q: m}), 1)[0].modules[Q].bias.tolist() == [2.0, 4.0, 6.0]


def test_outputs_keep_the_input_dtype_unless_told():
    a = make_adapter({Q: random_module(6, 5, 3, seed=1)}).with_dtype(torch.float16)
    assert scale(a, 2.0).modules[Q].dtype == torch.float16
    assert resize(a, 2, dtype=torch.bfloat16)[0].modules[Q].dtype == torch.bfloat16


def test_inputs_are_never_changed():
    a = make_adapter({Q: random_module(6, 5, 3, seed=1)})
    before = {k: v.clone() for k, v in a.state_dict().items()}
    config = dict(a.config)
    add(a, a, weights=[2.0, -1.0])
    resize(a, 1)
    assert config == a.config
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_modules_to_save_pass_through_and_conflicts_are_refused():
    head = torch.ones(4, 4)
    a = make_adapter({Q: random_module(6, 5, 2)}, modules_to_save=["lm_head"])
    a = type(a)(a.modules, a.config, {"base_model.model.lm_head.modules_to_save.default.weight": head})
    assert torch.equal(scale(a, 1.0).extra_tensors["base_model.model.lm_head.modules_to_save.default.weight"], head)
    with pytest.raises(SpecError, match="weight 3 has no exact meaning"):  # a full tensor replaces: it cannot be scaled
        scale(a, 3.0)
    assert add(a, a).config["modules_to_save"] == ["lm_head"]
    b = type(a)(a.modules, a.config, {"base_model.model.lm_head.modules_to_save.default.weight": 2 * head})
    with pytest.raises(SpecError, match="different copies"):
        add(a, b)


@pytest.mark.parametrize("rank", [0, -1, 2.5, "3", True, None])
def test_bad_ranks_are_refused(rank):
    a = make_adapter({Q: random_module(6, 5, 3)})
    with pytest.raises(ArgumentError, match="rank"):
        resize(a, rank)


@pytest.mark.parametrize(
    "kwargs",
    [{"energy": 0.0}, {"energy": 1.5}, {"max_rel_error": 1.0}, {"sv_ratio": 0.5}, {"energy": math.nan}, {"rank": 2, "energy": 0.9}],
)
def test_bad_criteria_are_refused(kwargs):
    with pytest.raises(ArgumentError):
        resize(make_adapter({Q: random_module(6, 5, 3)}), **kwargs)


def test_weights_must_match_the_inputs():
    a = make_adapter({Q: random_module(6, 5, 3)})
    with pytest.raises(ArgumentError, match="got 3 weight"):
        add(a, a, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ArgumentError, match="not a finite number"):
        add(a, a, weights=[1.0, math.inf])


def test_incompatible_shapes_name_the_module():
    with pytest.raises(ShapeError, match=rf"{Q}: input 1 has a linear ΔW of shape 6 x 5 but input 2 has a linear ΔW of shape 6 x 4"):
        add(make_adapter({Q: random_module(6, 5, 3)}), make_adapter({Q: random_module(6, 4, 3)}))


def test_dora_is_refused_with_the_reason():
    m = random_module(6, 5, 2)
    dora = make_adapter({Q: LoraModule(m.A, m.B, m.alpha, magnitude=torch.ones(6))}, use_dora=True)
    for op in (lambda: resize(dora, 1), lambda: scale(dora, 2.0), lambda: add(make_adapter({Q: m}), dora)):
        with pytest.raises(SpecError, match="DoRA .* not linear"):
            op()


# --- PEFT loads every output, and its merged weights and forward match the dense reference ---


@pytest.fixture(scope="module")
def peft_inputs(tmp_path_factory):
    from ..conftest import peft_adapter

    root = tmp_path_factory.mktemp("peft-inputs")
    a = peft_adapter(root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = peft_adapter(
        root / "b", seed=2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]
    )
    return load(a), load(b)


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _peft_matches(out_dir, reference: dict[str, torch.Tensor]) -> None:
    """Load ``out_dir`` with PEFT: no key warnings, merged weights = base + ΔW, forward = dense model's."""
    import warnings

    import peft

    from ..conftest import tiny_llama

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(tiny_llama(), out_dir).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message) or "unexpected" in str(w.message).lower()]
    want = tiny_llama()
    with torch.no_grad():
        for name, delta in reference.items():
            weight = want.get_submodule(name).weight
            weight += (delta.T if "embed" in name else delta).to(weight.dtype)
        ids = torch.tensor([[1, 5, 9, 33, 2, 60]])
        torch.testing.assert_close(model(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)
        merged = model.merge_and_unload().state_dict()
    for name, tensor in want.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-5)


def test_peft_loads_sums_scales_and_differences(peft_inputs, tmp_path):
    a, b = peft_inputs
    names = list(dict.fromkeys([*a.modules, *b.modules]))

    def combo(wa: float, wb: float) -> dict[str, torch.Tensor]:
        return {n: sum(w * dense(x.modules[n]) for x, w in ((a, wa), (b, wb)) if n in x.modules) for n in names}

    _peft_matches(save(add(a, b, weights=[0.7, -1.3]), tmp_path / "add"), combo(0.7, -1.3))
    _peft_matches(save(subtract(a, b), tmp_path / "sub"), combo(1.0, -1.0))
    _peft_matches(save(scale(a, -0.5), tmp_path / "scale"), {n: -0.5 * dense(m) for n, m in a.modules.items()})


def test_peft_loads_per_module_resized_ranks(peft_inputs, tmp_path):
    a, b = peft_inputs
    total = add(a, b)
    out, rows = resize(total, energy=0.8)
    assert len({r.new_rank for r in rows}) > 1, "the test needs per-module ranks (rank_pattern) to mean anything"
    reference = {r.module: _truncated(dense(total.modules[r.module]), r.new_rank) for r in rows}
    _peft_matches(save(out, tmp_path / "resized"), reference)


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.lin = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def test_peft_loads_resized_and_summed_conv_adapters(tmp_path):
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        model = peft.get_peft_model(_ConvNet(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "lin"], init_lora_weights=False))
        model.save_pretrained(tmp_path / "conv")
    a = load(tmp_path / "conv")
    assert a.modules["conv"].kind == "conv"
    total = add(a, scale(a, -0.25))  # 0.75·ΔW at rank 6
    small, rows = resize(total, rank=2)
    x = torch.randn(2, 3, 8, 8)
    for out, factor in ((total, 0.75), (small, None)):
        path = save(out, tmp_path / f"out-{out.modules['conv'].rank}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(_ConvNet(), path).eval()
        want = _ConvNet()
        with torch.no_grad():
            for name in ("conv", "lin"):
                weight = want.get_submodule(name).weight
                delta = factor * dense(a.modules[name]) if factor else dense(out.modules[name])
                weight += delta.reshape(weight.shape).float()
            torch.testing.assert_close(loaded(x), want(x), rtol=1e-5, atol=1e-5)
    assert [r.new_rank for r in rows] == [2, 2]
