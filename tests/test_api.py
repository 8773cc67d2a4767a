"""convert / save_as: kohya files into PEFT models built from a config, format defaults, and the CLI."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import loratools
from loratools.cli import main
from loratools.errors import ArgumentError, SpecError

Q, FC1 = "encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIPTextModel and its weights saved as a bare (single-component) base file."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12
    )
    model = CLIPTextModel(config).eval()
    assert Q + ".weight" in model.state_dict()  # transformers >= 5 has no "text_model." level; kohya names keep it
    path = tmp_path_factory.mktemp("clip") / "text_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return config, model, path


def _kohya_te(path, prefix="lora_te_"):
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 16, generator=g),
        f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 2, generator=g),
        f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        f"{prefix}text_model_encoder_layers_1_mlp_fc1.lora_down.weight": torch.randn(4, 16, generator=g),
        f"{prefix}text_model_encoder_layers_1_mlp_fc1.lora_up.weight": torch.randn(24, 4, generator=g),
    }
    save_file(tensors, str(path), metadata={"ss_network_dim": "Dynamic"})
    return path


def test_converted_kohya_loads_in_peft_and_matches_the_dense_merge(clip, tmp_path):
    from peft import PeftModel
    from transformers import CLIPTextModel

    config, model, base = clip
    src = _kohya_te(tmp_path / "te.safetensors")
    adapter = loratools.convert(src, tmp_path / "peft", to="peft", base=base)
    assert sorted(adapter.modules) == [Q, FC1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]  # PEFT warns on missing or unexpected keys
    merged = CLIPTextModel(config).eval()
    state = dict(model.state_dict())
    for name, module in adapter.modules.items():
        state[name + ".weight"] = state[name + ".weight"] + module.delta()
    merged.load_state_dict(state)
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).last_hidden_state, merged(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, model(input_ids=ids).last_hidden_state, atol=1e-3)  # the LoRA did something


def test_te1_prefix_survives_a_bare_base_round_trip(clip, tmp_path):
    src = _kohya_te(tmp_path / "te1.safetensors", prefix="lora_te1_")
    adapter = loratools.load(src, base=clip[2])
    assert sorted(adapter.modules) == [Q, FC1]
    out = loratools.save_as(adapter, tmp_path / "back.safetensors")
    assert all(k.startswith("lora_te1_") for k in loratools.load(out).modules)


def test_save_as_defaults_to_the_source_format(tmp_path):
    peft_adapter = loratools.Adapter({"a": loratools.LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)})
    assert loratools.source_format(peft_adapter) == "peft"
    assert (loratools.save_as(peft_adapter, tmp_path / "p") / "adapter_config.json").exists()
    kohya = loratools.load(_kohya_te(tmp_path / "k.safetensors"))
    loratools.save_as(kohya, tmp_path / "k2.safetensors")
    assert loratools.source_format(loratools.load(tmp_path / "k2.safetensors")) == "kohya"
    with pytest.raises(SpecError, match="still has its kohya name"):  # PEFT could not apply unmapped names
        loratools.save_as(kohya, tmp_path / "as-peft", to="peft")
    assert not (tmp_path / "as-peft").exists()
    with pytest.raises(ArgumentError, match="single file"):
        loratools.save_as(kohya, tmp_path / "dir-out", to="kohya")


def test_cli_convert_validate_inspect(clip, tmp_path):
    runner = CliRunner()
    src = str(_kohya_te(tmp_path / "te.safetensors"))
    out = str(tmp_path / "peft")
    result = runner.invoke(main, ["convert", src, "--to", "peft", "--base", str(clip[2]), "-o", out])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["convert", src, "--to", "peft", "--base", str(clip[2]), "-o", out]).exit_code == 3  # exists
    assert runner.invoke(main, ["convert", src, "--to", "peft", "--base", str(clip[2]), "-o", out, "--force"]).exit_code == 0
    unmapped = runner.invoke(main, ["convert", src, "--to", "peft", "-o", str(tmp_path / "unmapped")])
    assert unmapped.exit_code == 3 and "--base" in unmapped.stderr and not (tmp_path / "unmapped").exists()
    assert runner.invoke(main, ["validate", src, "--base", str(clip[2])]).exit_code == 0
    inspected = json.loads(runner.invoke(main, ["inspect", src, "--json"]).output)
    assert sorted((m["module"], m["rank"], m["alpha"]) for m in inspected["modules"]) == [
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 2, 1.0),
        ("lora_te_text_model_encoder_layers_1_mlp_fc1", 4, 4.0),
    ]
    save_file(
        {"lora_te_nowhere.lora_down.weight": torch.ones(1, 2), "lora_te_nowhere.lora_up.weight": torch.ones(2, 1)},
        str(tmp_path / "bad.safetensors"),
    )
    bad = runner.invoke(
        main, ["convert", str(tmp_path / "bad.safetensors"), "--to", "peft", "--base", str(clip[2]), "-o", str(tmp_path / "x")]
    )
    assert bad.exit_code == 3 and "lora_te_nowhere" in bad.output
