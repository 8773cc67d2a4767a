"""LyCORIS LoHa and LoKr files (kohya naming): exact LoRA factors, ΔW against the LyCORIS formulas, merges, refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loratools
from loratools.errors import FormatError

LIN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # base linear down_blocks.0.attentions.0.proj_in (8 x 12)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # base conv down_blocks.0.resnets.0.conv1 (8 x 4 x 3 x 3)
BASE_KEYS = {"down_blocks.0.attentions.0.proj_in.weight": (8, 12), "down_blocks.0.resnets.0.conv1.weight": (8, 4, 3, 3)}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loha_linear(r=3, alpha=1.5):
    t = {
        f"hada_w{n}_{s}": _randn(*shape, seed=i)
        for i, (n, s, shape) in enumerate([(1, "a", (8, r)), (1, "b", (r, 12)), (2, "a", (8, r)), (2, "b", (r, 12))])
    }
    return t, alpha


def _loha_tucker(r=2, alpha=4.0):
    """Tucker LoHa for a 3x3 conv: t (r, r, 3, 3), w_a (r, out), w_b (r, in) as lycoris/modules/loha.py builds them."""
    t = {"hada_t1": _randn(r, r, 3, 3, seed=10), "hada_w1_a": _randn(r, 8, seed=11), "hada_w1_b": _randn(r, 4, seed=12)}
    t |= {"hada_t2": _randn(r, r, 3, 3, seed=13), "hada_w2_a": _randn(r, 8, seed=14), "hada_w2_b": _randn(r, 4, seed=15)}
    return t, alpha


def _loha_reference(t, alpha, shape):
    """ΔW = alpha/r · (w1a·w1b ⊙ w2a·w2b), Tucker halves einsum("i j ..., j r, i p -> p r ..."): written from LyCORIS 4.1.3."""
    r = t["hada_w1_b"].shape[0]
    d = {k: v.double() for k, v in t.items()}
    if "hada_t1" in t:
        h1 = torch.einsum("ij...,jr,ip->pr...", d["hada_t1"], d["hada_w1_b"], d["hada_w1_a"])
        h2 = torch.einsum("ij...,jr,ip->pr...", d["hada_t2"], d["hada_w2_b"], d["hada_w2_a"])
    else:
        h1, h2 = d["hada_w1_a"] @ d["hada_w1_b"], d["hada_w2_a"] @ d["hada_w2_b"]
    return (alpha / r * h1 * h2).reshape(shape)


def _lokr_reference(t, alpha, shape):
    """ΔW = scale · kron(w1, w2) (scale alpha/r for factorised halves, 1 for two full ones), from LyCORIS 4.1.3."""
    d = {k: v.double() for k, v in t.items()}
    w1 = d["lokr_w1"] if "lokr_w1" in d else d["lokr_w1_a"] @ d["lokr_w1_b"]
    if "lokr_w2" in d:
        w2 = d["lokr_w2"]
    elif "lokr_t2" in d:
        w2 = torch.einsum("ij...,ip,jr->pr...", d["lokr_t2"], d["lokr_w2_a"], d["lokr_w2_b"])
    else:
        w2 = d["lokr_w2_a"] @ d["lokr_w2_b"]
    ranks = [d[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in d]
    scale = alpha / ranks[0] if ranks else 1.0
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))  # kron pads w1's trailing axes (functional/lokr.py make_kron)
    return (scale * torch.kron(w1, w2.contiguous())).reshape(shape)


LOKR_CASES = {
    # linear 8 x 12 = kron((2 x 3), (4 x 4)); conv 8 x 4 x 3 x 3 = kron((2 x 2), (4 x 2 x 3 x 3))
    "full-full": ({"lokr_w1": _randn(2, 3, seed=20), "lokr_w2": _randn(4, 4, seed=21)}, 5.0, LIN),
    "full-factored": ({"lokr_w1": _randn(2, 3, seed=22), "lokr_w2_a": _randn(4, 2, seed=23), "lokr_w2_b": _randn(2, 4, seed=24)}, 3.0, LIN),
    "factored-both": (
        {
            "lokr_w1_a": _randn(2, 1, seed=25),
            "lokr_w1_b": _randn(1, 3, seed=26),
            "lokr_w2_a": _randn(4, 1, seed=27),
            "lokr_w2_b": _randn(1, 4, seed=28),
        },
        0.5,
        LIN,
    ),
    "conv-full": ({"lokr_w1": _randn(2, 2, seed=29), "lokr_w2": _randn(4, 2, 3, 3, seed=30)}, 1.0, CONV),
    "conv-tucker": (
        {
            "lokr_w1": _randn(2, 2, seed=31),
            "lokr_t2": _randn(2, 2, 3, 3, seed=32),
            "lokr_w2_a": _randn(2, 4, seed=33),
            "lokr_w2_b": _randn(2, 2, seed=34),
        },
        1.0,
        CONV,
    ),
}


def _write(path, modules):
    """A LyCORIS file: kohya module name -> (suffix -> tensor, alpha or None)."""
    tensors = {}
    for name, (t, alpha) in modules.items():
        tensors |= {f"{name}.{s}": v for s, v in t.items()}
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path


def _base(path):
    tensors = {k: _randn(*shape, seed=99 + i) for i, (k, shape) in enumerate(BASE_KEYS.items())}
    save_file(tensors, str(path))
    return tensors


def _shape(name):
    return next(s for k, s in BASE_KEYS.items() if name.endswith(k[: -len(".weight")].replace(".", "_")))


@pytest.mark.parametrize("case", ["linear", "tucker", "no-alpha"])
def test_loha_reads_as_exact_lora(tmp_path, case):
    (t, alpha), name = {"linear": (_loha_linear(), LIN), "tucker": (_loha_tucker(), CONV), "no-alpha": ((_loha_linear()[0], None), LIN)}[
        case
    ]
    adapter = loratools.load(_write(tmp_path / "loha.safetensors", {name: (t, alpha)}))
    m = adapter.modules[name]
    r = t["hada_w1_b"].shape[0]
    assert m.rank == r * r and m.kind == ("conv" if case == "tucker" else "linear")
    reference = _loha_reference(t, alpha if alpha else r, _shape(name))  # missing alpha: alpha = r, scale 1
    err = (m.delta().double() - reference).norm() / reference.norm()
    assert err < 1e-6, err


@pytest.mark.parametrize("case", sorted(LOKR_CASES))
def test_lokr_reads_as_exact_lora(tmp_path, case):
    t, alpha, name = LOKR_CASES[case]
    m = loratools.load(_write(tmp_path / "lokr.safetensors", {name: (t, alpha)})).modules[name]
    reference = _lokr_reference(t, alpha, _shape(name))
    err = (m.delta().double() - reference).norm() / reference.norm()
    assert err < 1e-6, err
    if case == "full-full":
        assert m.scale * m.rank == pytest.approx(m.rank)  # no rank: scale 1 whatever the stored alpha


def test_against_the_lycoris_package():
    """The deltas equal lycoris-lora's own functional kernels (when the package is installed)."""
    loha_fn = pytest.importorskip("lycoris.functional.loha")
    lokr_fn = pytest.importorskip("lycoris.functional.lokr")
    from loratools.formats import loha, lokr

    for t, alpha, shape in ((*_loha_linear(), (8, 12)), (*_loha_tucker(), (8, 4, 3, 3))):
        r = t["hada_w1_b"].shape[0]
        weights = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"), t.get("hada_t2"))
        theirs = loha_fn.diff_weight(*weights, gamma=alpha / r).reshape(shape)
        ours = loha.module(t, alpha)[0].delta()
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    for t, alpha, name in LOKR_CASES.values():
        ranks = [t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
        g = {k: t.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
        theirs = lokr_fn.kron_weight(*g.values(), t=t.get("lokr_t2"), scale=alpha / ranks[0] if ranks else 1.0).reshape(_shape(name))
        assert torch.allclose(lokr.module(t, alpha)[0].delta(), theirs, rtol=1e-5, atol=1e-5)


def test_merge_equals_dense_reference(tmp_path):
    """A LoHa linear and a LoKr Tucker conv, kohya-named, merged into a tiny UNet-shaped base."""
    base = _base(tmp_path / "base.safetensors")
    (ht, ha), (kt, ka, _) = _loha_linear(), LOKR_CASES["conv-tucker"]
    src = _write(tmp_path / "lyco.safetensors", {LIN: (ht, ha), CONV: (kt, ka)})
    loratools.merge(tmp_path / "base.safetensors", [src], out=tmp_path / "merged.safetensors", weights=[0.75])
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    lin, conv = BASE_KEYS
    want_lin = base[lin].double() + 0.75 * _loha_reference(ht, ha, (8, 12))
    want_conv = base[conv].double() + 0.75 * _lokr_reference(kt, ka, (8, 4, 3, 3))
    assert (merged[lin].double() - want_lin).abs().max() < 1e-5
    assert (merged[conv].double() - want_conv).abs().max() < 1e-5


def test_convert_to_peft_and_kohya_is_exact(tmp_path):
    _base(tmp_path / "base.safetensors")
    (ht, ha), (kt, ka, _) = _loha_linear(), LOKR_CASES["conv-tucker"]
    src = _write(tmp_path / "lyco.safetensors", {LIN: (ht, ha), CONV: (kt, ka)})
    source = loratools.load(src)
    loratools.convert(src, tmp_path / "peft", to="peft", base=tmp_path / "base.safetensors")
    loratools.convert(src, tmp_path / "k.safetensors", to="kohya")
    peft, kohya = loratools.load(tmp_path / "peft"), loratools.load(tmp_path / "k.safetensors")
    assert sorted(peft.modules) == ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"]
    for name, m in source.modules.items():
        assert torch.equal(kohya.modules[name].delta(), m.delta())
    assert torch.equal(peft.modules["down_blocks.0.attentions.0.proj_in"].delta(), source.modules[LIN].delta())


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_flattened_conv_halves_take_the_base_kernel_shape(tmp_path, kind):
    """Without Tucker cores LyCORIS stores conv halves as (r, in·kh·kw); with --base they become conv modules."""
    base = _base(tmp_path / "base.safetensors")
    conv = "down_blocks.0.resnets.0.conv1.weight"
    if kind == "loha":
        t = {
            "hada_w1_a": _randn(8, 2, seed=50),
            "hada_w1_b": _randn(2, 36, seed=51),
            "hada_w2_a": _randn(8, 2, seed=52),
            "hada_w2_b": _randn(2, 36, seed=53),
        }
        reference = _loha_reference(t, 1.0, (8, 4, 3, 3))
    else:  # kron((2 x 2), (4 x 2·3·3)) with w2 factorised, as lycoris/modules/lokr.py's conv-not-tucker branch builds it
        t = {"lokr_w1": _randn(2, 2, seed=54), "lokr_w2_a": _randn(4, 2, seed=55), "lokr_w2_b": _randn(2, 18, seed=56)}
        reference = _lokr_reference(t, 1.0, (8, 4, 3, 3))
    src = _write(tmp_path / "flat.safetensors", {CONV: (t, 1.0)})
    assert loratools.load(src).modules[CONV].A.dim() == 2  # no base: the kernel shape is unknown
    m = loratools.load(src, base=tmp_path / "base.safetensors").modules["down_blocks.0.resnets.0.conv1"]
    assert m.kind == "conv" and tuple(m.A.shape[1:]) == (4, 3, 3)
    loratools.merge(tmp_path / "base.safetensors", [src], out=tmp_path / "merged.safetensors")
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        merged = f.get_tensor(conv)
    assert (merged.double() - base[conv].double() - reference).abs().max() < 1e-5


def test_tucker_locon_folds_its_core_into_the_down(tmp_path):
    """lora_down (r, in, 1, 1), lora_mid (r, r, 3, 3), lora_up (out, r, 1, 1): ΔW = alpha/r · mid ×₀ up ×₁ down."""
    down, mid, up = _randn(2, 4, 1, 1, seed=60), _randn(2, 2, 3, 3, seed=61), _randn(8, 2, 1, 1, seed=62)
    tensors = {
        f"{CONV}.lora_down.weight": down,
        f"{CONV}.lora_mid.weight": mid,
        f"{CONV}.lora_up.weight": up,
        f"{CONV}.alpha": torch.tensor(1.0),
    }
    save_file(tensors, str(tmp_path / "locon.safetensors"))
    m = loratools.load(tmp_path / "locon.safetensors").modules[CONV]
    reference = 0.5 * torch.einsum("ij...,pi,jr->pr...", mid.double(), up.double().reshape(8, 2), down.double().reshape(2, 4))
    assert m.rank == 2 and m.kind == "conv"
    assert (m.delta().double() - reference).abs().max() < 1e-5
    locon_fn = pytest.importorskip("lycoris.functional.locon")
    assert torch.allclose(m.delta(), locon_fn.diff_weight(down, up, mid, gamma=0.5), rtol=1e-5, atol=1e-5)


def test_factor_sizes_are_predicted_from_shapes():
    from loratools.formats import loha, lokr

    for t, _ in (_loha_linear(), _loha_tucker()):
        m = loha.module(t, 1.0)[0]
        assert loha.factor_numel(t) == m.A.numel() + m.B.numel()
    for t, alpha, _ in LOKR_CASES.values():
        m = lokr.module(t, alpha)[0]
        assert lokr.factor_numel(t) == m.A.numel() + m.B.numel()


def test_kron_amplification_is_refused_before_forming(tmp_path):
    """A 2 MB file whose kron would be 2 x 10^6 x 10^6 ... elements: one line, nothing allocated."""
    t = {"lokr_w1": torch.ones(700, 700), "lokr_w2_a": torch.ones(400000, 1), "lokr_w2_b": torch.ones(1, 400000)}
    save_file({f"{LIN}.{k}": v for k, v in t.items()}, str(tmp_path / "bomb.safetensors"))
    with pytest.raises(FormatError, match="more than this machine's"):
        loratools.load(tmp_path / "bomb.safetensors")


def test_mixed_file_reads_plain_lora_modules_too(tmp_path):
    down, up = _randn(2, 12, seed=40), _randn(8, 2, seed=41)
    tensors = {f"{LIN}.lora_down.weight": down, f"{LIN}.lora_up.weight": up, f"{LIN}.alpha": torch.tensor(1.0)}
    tensors |= {f"{CONV}.{k}": v for k, v in LOKR_CASES["conv-full"][0].items()}
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    adapter = loratools.load(tmp_path / "mixed.safetensors")
    assert torch.allclose(adapter.modules[LIN].delta(), 0.5 * up @ down)


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({f"{LIN}.hada_w1_a": torch.ones(8, 2)}, "LoHa module lacks hada_w1_b"),
        ({f"{LIN}.lokr_w1": torch.ones(2, 3)}, "LoKr half 2 needs lokr_w2"),
        ({f"{LIN}.lokr_w1": torch.ones(2, 3), f"{LIN}.lokr_w2": torch.ones(4, 4), f"{LIN}.dora_scale": torch.ones(1, 5)}, "dora_scale"),
        (
            {
                f"{LIN}.hada_w1_a": torch.ones(8, 2),
                f"{LIN}.hada_w1_b": torch.ones(3, 12),
                f"{LIN}.hada_w2_a": torch.ones(8, 2),
                f"{LIN}.hada_w2_b": torch.ones(2, 12),
            },
            "LoHa",
        ),
        (
            {f"{LIN}.lokr_w1": torch.ones(2, 3), f"{LIN}.lokr_w2": torch.ones(4, 4), f"{LIN}.junk": torch.ones(1)},
            "not a LoHa, LoKr or LoRA factor",
        ),
    ],
)
def test_bad_lycoris_modules_are_one_line_naming_the_module(tmp_path, tensors, match):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FormatError, match=match) as info:
        loratools.load(tmp_path / "bad.safetensors")
    assert LIN in str(info.value)


SQUARE = "lora_unet_down_blocks_0_attentions_0_proj_out"  # base linear down_blocks.0.attentions.0.proj_out (12 x 12)


def _dora_reference(W, delta, dora, on_out):
    """LyCORIS 4.1.3 functional/general.py _weight_decompose at multiplier 1: W_c = W + ΔW, W' = W_c · m / (‖W_c‖ + ε),
    the norm per output row (wd_on_out) or per input column over every other axis; in float64."""
    Wc = W.double() + delta
    if on_out:
        norm = Wc.reshape(Wc.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (Wc.dim() - 1))
    else:
        norm = Wc.transpose(0, 1).reshape(Wc.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (Wc.dim() - 2))
    return Wc * dora.double() / (norm + torch.finfo(torch.float32).eps)


@pytest.mark.parametrize(("on_out", "weight"), [(False, 1.0), (False, 0.5), (True, 1.0)], ids=["in-axis", "in-axis-w0.5", "out-axis"])
def test_dora_doha_merges_equal_lycoris_weight_decompose(tmp_path, on_out, weight):
    """DoRA on a LoCon linear, a LoCon conv and a LoHa on a square layer, both conventions, against the formula
    and lycoris-lora's own _weight_decompose: the square layer is where confusing the axes goes unnoticed.
    Weight 0.5 on in-axis DoRA: W + 0.5·(W' − W), as ComfyUI applies a strength."""
    keys = {**BASE_KEYS, "down_blocks.0.attentions.0.proj_out.weight": (12, 12)}
    base = {k: _randn(*shape, seed=70 + i) for i, (k, shape) in enumerate(keys.items())}
    save_file(base, str(tmp_path / "base.safetensors"))
    lin_down, lin_up, conv_down, conv_up = (
        _randn(2, 12, seed=80),
        _randn(8, 2, seed=81),
        _randn(3, 4, 3, 3, seed=82),
        _randn(8, 3, 1, 1, seed=83),
    )
    loha_t = {
        f"hada_w{n}_{s}": _randn(*shape, seed=84 + i)
        for i, (n, s, shape) in enumerate([(1, "a", (12, 2)), (1, "b", (2, 12)), (2, "a", (12, 2)), (2, "b", (2, 12))])
    }
    loha_alpha = 1.0

    def magnitude(out, inp, conv, seed):
        shape = (out, 1) if on_out else (1, inp)
        return (torch.rand(*shape, *([1, 1] if conv else []), generator=torch.Generator().manual_seed(seed)) + 0.5) * 3

    doras = {LIN: magnitude(8, 12, False, 1), CONV: magnitude(8, 4, True, 2), SQUARE: magnitude(12, 12, False, 3)}
    tensors = {
        f"{LIN}.lora_down.weight": lin_down,
        f"{LIN}.lora_up.weight": lin_up,
        f"{LIN}.alpha": torch.tensor(1.0),
        f"{CONV}.lora_down.weight": conv_down,
        f"{CONV}.lora_up.weight": conv_up,
        **{f"{SQUARE}.{k}": v for k, v in loha_t.items()},
        f"{SQUARE}.alpha": torch.tensor(loha_alpha),
        **{f"{name}.dora_scale": d for name, d in doras.items()},
    }
    save_file(tensors, str(tmp_path / "dora.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    adapter = loratools.load(tmp_path / "dora.safetensors")
    assert {m.magnitude_axis for m in adapter.modules.values()} == {"out" if on_out else "in"}
    merged_path = tmp_path / "merged.safetensors"
    loratools.merge(tmp_path / "base.safetensors", [tmp_path / "dora.safetensors"], out=merged_path, weights=[weight])
    with safe_open(str(merged_path), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    deltas = {
        LIN: 0.5 * (lin_up @ lin_down).double(),
        CONV: (conv_up.reshape(8, 3) @ conv_down.reshape(3, -1)).reshape(8, 4, 3, 3).double(),
        SQUARE: _loha_reference(loha_t, loha_alpha, (12, 12)),
    }
    lycoris_decompose = getattr(_lycoris_general(), "_weight_decompose", None)
    for name, key in (
        (LIN, "down_blocks.0.attentions.0.proj_in.weight"),
        (CONV, "down_blocks.0.resnets.0.conv1.weight"),
        (SQUARE, "down_blocks.0.attentions.0.proj_out.weight"),
    ):
        want = base[key].double() + weight * (_dora_reference(base[key], deltas[name], doras[name], on_out) - base[key].double())
        err = float((merged[key].double() - want).abs().max() / want.abs().max())
        assert err < 2e-6, (name, err)
        if lycoris_decompose is not None and weight == 1.0:  # the package's own kernel, fed the same float32 W + ΔW
            theirs = lycoris_decompose((base[key].double() + deltas[name]).float(), doras[name], 1, on_out)
            assert float((merged[key] - theirs).abs().max() / theirs.abs().max()) < 2e-6, name
    key = "down_blocks.0.attentions.0.proj_out.weight"  # read along the other axis, the square layer's weight is visibly different
    other = _dora_reference(base[key], deltas[SQUARE], doras[SQUARE].reshape(doras[SQUARE].shape[::-1]), not on_out)
    assert float((merged[key].double() - other).abs().max()) > 1e-2 * weight


def _lycoris_general():
    """lycoris-lora's functional/general.py when installed (the reference DoRA step), else None."""
    try:
        from lycoris.functional import general
    except ImportError:
        return None
    return general


def test_flattened_conv_doha_needs_the_base_for_in_channels(tmp_path):
    """A LoHa conv without Tucker cores stores its halves as (r, in·kh·kw): a (1, in, 1, 1) dora_scale can only be
    placed once the base gives the kernel shape; with it the merge equals LyCORIS's formula."""
    base = _base(tmp_path / "base.safetensors")
    t = {
        f"hada_w{n}_{s}": _randn(*shape, seed=90 + i)
        for i, (n, s, shape) in enumerate([(1, "a", (8, 2)), (1, "b", (2, 36)), (2, "a", (8, 2)), (2, "b", (2, 36))])
    }
    dora = torch.tensor([2.0, 3.0, 4.0, 5.0]).reshape(1, 4, 1, 1)
    tensors = {f"{CONV}.{k}": v for k, v in t.items()} | {f"{CONV}.alpha": torch.tensor(1.0), f"{CONV}.dora_scale": dora}
    save_file(tensors, str(tmp_path / "doha.safetensors"))
    with pytest.raises(FormatError, match="give the base"):
        loratools.load(tmp_path / "doha.safetensors")
    loratools.merge(tmp_path / "base.safetensors", [tmp_path / "doha.safetensors"], out=tmp_path / "merged.safetensors")
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        merged = f.get_tensor("down_blocks.0.resnets.0.conv1.weight")
    key = "down_blocks.0.resnets.0.conv1.weight"
    want = _dora_reference(base[key], _loha_reference(t, 1.0, (8, 4, 3, 3)), dora, on_out=False)
    assert float((merged.double() - want).abs().max() / want.abs().max()) < 2e-6
