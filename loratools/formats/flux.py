"""Flux.1 LoRA key layouts, read into the module names of diffusers' ``FluxTransformer2DModel``.

Flux LoRAs come in four layouts:

- BFL's original (``double_blocks.0.img_attn.qkv.lora_A.weight``, also ``lora_down``/``lora_up`` and
  ``.alpha``, optionally behind ``diffusion_model.``): fused projections, ``img_attn.qkv`` = q, k, v
  and ``single_blocks.N.linear1`` = q, k, v and the MLP input;
- kohya/musubi (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``): the same modules
  flattened, CLIP-L modules (``lora_te1_...``) beside them, kept as kohya names;
- XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``): attention processors, no alpha (scale 1);
- diffusers/PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``): read by :mod:`.diffusers`.

The first three are read through :data:`BFL` / :data:`XLABS` into ``transformer.<diffusers module>``,
fused modules split by rows of B (:mod:`.fusion`), so validation, merge into a diffusers-layout
base and every writer see the modules diffusers' model has.  Onto a base in BFL's layout (keys
``double_blocks.``) modules keep BFL's names.  kohya output fuses them back
(``Architecture.to_original``).  The tables are those of diffusers 0.42
``loaders/lora_conversion_utils.py`` (``_convert_kohya_flux_lora_to_diffusers``,
``_convert_xlabs_flux_lora_to_diffusers``, ``_convert_bfl_flux_control_lora_to_diffusers``) and
``loaders/single_file_utils.convert_flux_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import re

from .fusion import KOHYA_KEY, ORIGINAL_KEY, ORIGINAL_PREFIX, Architecture, Layout, Row, Table

_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
_D, _S = "transformer_blocks.{i}.", "single_transformer_blocks.{i}."

BFL = Table(
    [
        Row("double_blocks.{i}.img_attn.qkv", "equal", tuple(f"{_D}attn.{p}" for p in _QKV)),
        Row("double_blocks.{i}.txt_attn.qkv", "equal", tuple(f"{_D}attn.{p}" for p in _ADD_QKV)),
        Row("double_blocks.{i}.img_attn.proj", "one", (f"{_D}attn.to_out.0",)),
        Row("double_blocks.{i}.txt_attn.proj", "one", (f"{_D}attn.to_add_out",)),
        Row("double_blocks.{i}.img_mlp.0", "one", (f"{_D}ff.net.0.proj",)),
        Row("double_blocks.{i}.img_mlp.2", "one", (f"{_D}ff.net.2",)),
        Row("double_blocks.{i}.txt_mlp.0", "one", (f"{_D}ff_context.net.0.proj",)),
        Row("double_blocks.{i}.txt_mlp.2", "one", (f"{_D}ff_context.net.2",)),
        Row("double_blocks.{i}.img_mod.lin", "one", (f"{_D}norm1.linear",)),
        Row("double_blocks.{i}.txt_mod.lin", "one", (f"{_D}norm1_context.linear",)),
        Row("single_blocks.{i}.linear1", "qkv_mlp", (*(f"{_S}attn.{p}" for p in _QKV), f"{_S}proj_mlp")),
        Row("single_blocks.{i}.linear2", "one", (f"{_S}proj_out",)),
        Row("single_blocks.{i}.modulation.lin", "one", (f"{_S}norm.linear",)),
        Row("img_in", "one", ("x_embedder",)),
        Row("txt_in", "one", ("context_embedder",)),
        Row("time_in.in_layer", "one", ("time_text_embed.timestep_embedder.linear_1",)),
        Row("time_in.out_layer", "one", ("time_text_embed.timestep_embedder.linear_2",)),
        Row("vector_in.in_layer", "one", ("time_text_embed.text_embedder.linear_1",)),
        Row("vector_in.out_layer", "one", ("time_text_embed.text_embedder.linear_2",)),
        Row("guidance_in.in_layer", "one", ("time_text_embed.guidance_embedder.linear_1",)),
        Row("guidance_in.out_layer", "one", ("time_text_embed.guidance_embedder.linear_2",)),
        Row("final_layer.linear", "one", ("proj_out",)),
        Row("final_layer.adaLN_modulation.1", "adaln", ("norm_out.linear",)),  # (shift, scale) -> (scale, shift)
    ]
)
# XLabs' processors: qkv_lora1/proj_lora1 act on the image stream, *2 on the text stream; a single
# block's qkv_lora on the q, k, v rows of linear1 only and its proj_lora on linear2 (proj_out).
XLABS = Table(
    [
        Row("double_blocks.{i}.processor.qkv_lora1", "equal", tuple(f"{_D}attn.{p}" for p in _QKV)),
        Row("double_blocks.{i}.processor.qkv_lora2", "equal", tuple(f"{_D}attn.{p}" for p in _ADD_QKV)),
        Row("double_blocks.{i}.processor.proj_lora1", "one", (f"{_D}attn.to_out.0",)),
        Row("double_blocks.{i}.processor.proj_lora2", "one", (f"{_D}attn.to_add_out",)),
        Row("single_blocks.{i}.processor.qkv_lora", "equal", tuple(f"{_S}attn.{p}" for p in _QKV)),
        Row("single_blocks.{i}.processor.proj_lora", "one", (f"{_S}proj_out",)),
    ]
)

FLUX = Architecture(
    "flux",
    (
        Layout(
            "kohya",
            re.compile(r"lora_unet_(?:(?:double|single)_blocks_\d+_|img_in\.|txt_in\.|(?:time|vector|guidance)_in_)"),
            KOHYA_KEY,
            BFL,
            flat=True,
            source="kohya",
        ),
        Layout(
            "xlabs",
            re.compile(ORIGINAL_PREFIX + r"(?:double|single)_blocks\.\d+\.processor\."),
            re.compile(ORIGINAL_PREFIX + r"(?P<module>.+?)\.(?P<role>down\.weight|up\.weight)"),
            XLABS,
            flat=False,
            source="diffusers",
        ),
        Layout(
            "BFL",
            re.compile(ORIGINAL_PREFIX + r"(?:double|single)_blocks\.\d+\.\w+"),
            ORIGINAL_KEY,
            BFL,
            flat=False,
            source="diffusers",
        ),
    ),
    BFL,
    base_marker="double_blocks.",
    signature="transformer.single_transformer_blocks.",
)
