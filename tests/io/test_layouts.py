"""Checkpoint key layouts: transformers 5 module names -> the keys VLM and MoE checkpoints store."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.io.checkpoint import module_index, open_checkpoint
from loratools.io.layouts import Layout, Piece, expert_pieces, layout_of, renamed, weight_key


def _checkpoint(path: Path, tensors: dict[str, tuple[int, ...]], model_type: str | None = None):
    path.mkdir()
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, path / "model.safetensors")
    if model_type is not None:
        (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return open_checkpoint(path)


def test_renames_mirror_transformers_conversion_mapping():
    llava = layout_of(Path("/nonexistent"), ["language_model.model.embed_tokens.weight"])
    assert llava.model_type == "llava"
    assert renamed("model.language_model.layers.0.self_attn.q_proj", llava) == "language_model.model.layers.0.self_attn.q_proj"
    assert renamed("lm_head", llava) == "language_model.lm_head"
    assert renamed("model.vision_tower.encoder.layers.0.mlp.fc1", llava) == "vision_tower.encoder.layers.0.mlp.fc1"
    assert renamed("model.multi_modal_projector.linear_1", llava) == "multi_modal_projector.linear_1"
    qwen = Layout("qwen2_vl", layout_of(Path("/x"), ["visual.blocks.0.attn.qkv.weight"]).renames)
    assert renamed("model.language_model.layers.1.mlp.down_proj", qwen) == "model.layers.1.mlp.down_proj"
    assert renamed("model.visual.blocks.0.attn.qkv", qwen) == "visual.blocks.0.attn.qkv"
    mixtral = layout_of(Path("/x"), ["model.layers.0.block_sparse_moe.gate.weight"])
    assert renamed("model.layers.0.mlp.gate", mixtral) == "model.layers.0.block_sparse_moe.gate"
    assert renamed("model.layers.0.self_attn.q_proj", mixtral) is None
    assert layout_of(Path("/x"), ["model.layers.0.mlp.gate_proj.weight"]) == Layout(None)


def test_config_json_model_type_wins_over_key_signature(tmp_path):
    ckpt = _checkpoint(tmp_path / "g", {"language_model.model.layers.0.self_attn.q_proj.weight": (4, 4)}, "gemma3")
    layout = layout_of(ckpt.root, list(ckpt.tensors))
    assert layout.model_type == "gemma3"
    index = module_index(list(ckpt.tensors))
    assert weight_key("model.language_model.layers.0.self_attn.q_proj", index, layout) == (
        "language_model.model.layers.0.self_attn.q_proj.weight"
    )
    plain = _checkpoint(tmp_path / "p", {"language_model.model.layers.0.self_attn.q_proj.weight": (4, 4)}, "llama")
    assert layout_of(plain.root, list(plain.tensors)) == Layout("llama")  # no VLM renames for a model that is not one


def test_per_expert_pieces_split_gate_then_up(tmp_path):
    """Mixtral: experts.e.w1 (gate, 3 rows) then w3 (up, 3 rows) make rows 0:3 and 3:6 of gate_up's ΔW[e]."""
    shapes = {f"model.layers.0.block_sparse_moe.experts.{e}.{n}.weight": (3, 4) for e in range(2) for n in ("w1", "w3")}
    shapes |= {f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight": (4, 3) for e in range(2)}
    ckpt = _checkpoint(tmp_path / "m", shapes, "mixtral")
    layout, index = layout_of(ckpt.root, list(ckpt.tensors)), module_index(list(ckpt.tensors))
    pieces = expert_pieces("model.layers.0.mlp.experts.gate_up_proj", 2, ckpt.tensors, index, layout)
    prefix = "model.layers.0.block_sparse_moe.experts"
    assert pieces == [
        Piece(f"{prefix}.0.w1.weight", 0, (0, 3)),
        Piece(f"{prefix}.0.w3.weight", 0, (3, 6)),
        Piece(f"{prefix}.1.w1.weight", 1, (0, 3)),
        Piece(f"{prefix}.1.w3.weight", 1, (3, 6)),
    ]
    assert expert_pieces("model.layers.0.mlp.experts.down_proj", 2, ckpt.tensors, index, layout) == [
        Piece(f"{prefix}.0.w2.weight", 0, (0, 4)),
        Piece(f"{prefix}.1.w2.weight", 1, (0, 4)),
    ]
    more = expert_pieces("model.layers.0.mlp.experts.down_proj", 1, ckpt.tensors, index, layout)
    assert isinstance(more, str) and "base has more" in more
    fewer = expert_pieces("model.layers.0.mlp.experts.down_proj", 3, ckpt.tensors, index, layout)
    assert isinstance(fewer, str) and "experts.2.w2.weight" in fewer
    missing = expert_pieces("model.layers.1.mlp.experts.down_proj", 2, ckpt.tensors, index, layout)
    assert isinstance(missing, str) and "no base tensor model.layers.1.mlp.experts.down_proj" in missing


def test_fused_piece_under_the_parameter_name(tmp_path):
    ckpt = _checkpoint(tmp_path / "f", {"model.layers.0.mlp.experts.gate_up_proj": (2, 6, 4)}, "qwen3_moe")
    layout, index = layout_of(ckpt.root, list(ckpt.tensors)), module_index(list(ckpt.tensors))
    got = expert_pieces("model.layers.0.mlp.experts.gate_up_proj", 2, ckpt.tensors, index, layout)
    assert got == [Piece("model.layers.0.mlp.experts.gate_up_proj", None, (0, 0))]
    assert not layout.transposed_experts and Layout("gpt_oss").transposed_experts
