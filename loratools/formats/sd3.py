"""Stable Diffusion 3 / 3.5 LoRA key layouts, read into the module names of diffusers' ``SD3Transformer2DModel``.

sd-scripts' SD3 LoRAs (``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``) and
original-layout ones (``joint_blocks.0.x_block.attn.qkv.lora_A.weight``, optionally behind
``diffusion_model.``) name Stability's MMDiT modules, whose ``attn.qkv`` (and SD3.5's ``attn2.qkv``)
fuse q, k and v; they read into ``transformer.<diffusers module>`` with those split by rows of B
(:mod:`.fusion`), or keep the original names onto an original-layout base (keys ``joint_blocks.``).
The last block's context stream is ``pre_only``: its ``adaLN_modulation.1`` outputs (shift, scale),
2·in rows, which diffusers stores as (scale, shift), like ``final_layer.adaLN_modulation.1``.
Table: diffusers 0.42 ``loaders/single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import re

from .fusion import KOHYA_KEY, ORIGINAL_KEY, ORIGINAL_PREFIX, Architecture, Layout, Row, Table

_B = "transformer_blocks.{i}."


def _stream(block: str, qkv: tuple[str, ...], out: str, ff: str, norm: str) -> list[Row]:
    src = f"joint_blocks.{{i}}.{block}."
    return [
        Row(src + "attn.qkv", "equal", tuple(f"{_B}attn.{p}" for p in qkv)),
        Row(src + "attn.proj", "one", (f"{_B}attn.{out}",)),
        Row(src + "mlp.fc1", "one", (f"{_B}{ff}.net.0.proj",)),
        Row(src + "mlp.fc2", "one", (f"{_B}{ff}.net.2",)),
        Row(src + "adaLN_modulation.1", "adaln", (f"{_B}{norm}.linear",)),
    ]


MMDIT = Table(
    [
        *_stream("x_block", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
        *_stream("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context"),
        Row("joint_blocks.{i}.x_block.attn2.qkv", "equal", tuple(f"{_B}attn2.{p}" for p in ("to_q", "to_k", "to_v"))),
        Row("joint_blocks.{i}.x_block.attn2.proj", "one", (f"{_B}attn2.to_out.0",)),
        Row("x_embedder.proj", "one", ("pos_embed.proj",)),
        Row("context_embedder", "one", ("context_embedder",)),
        Row("t_embedder.mlp.0", "one", ("time_text_embed.timestep_embedder.linear_1",)),
        Row("t_embedder.mlp.2", "one", ("time_text_embed.timestep_embedder.linear_2",)),
        Row("y_embedder.mlp.0", "one", ("time_text_embed.text_embedder.linear_1",)),
        Row("y_embedder.mlp.2", "one", ("time_text_embed.text_embedder.linear_2",)),
        Row("final_layer.linear", "one", ("proj_out",)),
        Row("final_layer.adaLN_modulation.1", "adaln", ("norm_out.linear",)),
    ]
)

SD3 = Architecture(
    "sd3",
    (
        Layout(
            "kohya",
            re.compile(r"lora_unet_joint_blocks_\d+_"),
            KOHYA_KEY,
            MMDIT,
            flat=True,
            source="kohya",
        ),
        Layout(
            "original",
            re.compile(ORIGINAL_PREFIX + r"joint_blocks\.\d+\.(?:x|context)_block\."),
            ORIGINAL_KEY,
            MMDIT,
            flat=False,
            source="diffusers",
        ),
    ),
    MMDIT,
    base_marker="joint_blocks.",
)
