"""The Stable Diffusion UNet's module names: original (LDM/SGM single file) vs diffusers' ``UNet2DConditionModel``.

kohya LoRAs for SD1/SD2 name the diffusers UNet (``lora_unet_down_blocks_0_attentions_0_proj_in``);
SDXL ones trained by sd-scripts name the SGM UNet (``lora_unet_input_blocks_4_1_proj_in``); base
checkpoints come in either layout (a single ``model.diffusion_model.input_blocks...`` file, or a
diffusers ``unet/``).  :func:`to_diffusers` and :func:`to_original` map module paths between the two
so either kind of name finds either kind of base (:func:`loratools.formats.kohya.map_names`).

Both layouts hold the same modules; only block addresses and ResNet parts are renamed.  With L =
:data:`LAYERS` ResNets per level (2 in SD1, SD2 and SDXL: ``num_res_blocks``), input block
1 + i·(L+1) + j is down block i's ResNet j (``.0``) and attention j (``.1``), input block (i+1)·(L+1)
its downsampler; output block i·(L+1) + j is up block i's ResNet j and attention j, and the up block's
upsampler is ``.1.conv`` or, after an attention, ``.2.conv`` of its last output block.  Rules from
diffusers 0.42 ``loaders/single_file_utils.convert_ldm_unet_checkpoint``.
"""

from __future__ import annotations

import re

LAYERS = 2

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_ORIGINAL = re.compile(r"(?P<where>input_blocks|output_blocks)\.(?P<n>\d+)\.(?P<k>\d+)\.(?P<rest>.+)")
_ORIGINAL_MIDDLE = re.compile(r"middle_block\.(?P<n>\d+)\.(?P<rest>.+)")
_DIFFUSERS = re.compile(
    r"(?P<where>down_blocks|mid_block|up_blocks)(?:\.(?P<i>\d+))?\.(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<j>\d+)\.(?P<rest>.+)"
)
_MIDDLE = {0: "resnets.0", 1: "attentions.0", 2: "resnets.1"}
_MIDDLE_BACK = {v: k for k, v in _MIDDLE.items()}


def to_diffusers(path: str) -> str | None:
    """The diffusers UNet path of original-layout module ``path`` (no ``model.diffusion_model.``), or None."""
    if path in _TOP:
        return _TOP[path]
    middle = _ORIGINAL_MIDDLE.fullmatch(path)
    if middle is not None:
        part = _MIDDLE.get(int(middle["n"]))
        inner = (_RESNET.get(middle["rest"]) if part.startswith("resnets") else middle["rest"]) if part else None
        return f"mid_block.{part}.{inner}" if inner else None
    match = _ORIGINAL.fullmatch(path)
    if match is None:
        return None
    where, n, k, rest = match["where"], int(match["n"]), int(match["k"]), match["rest"]
    if where == "input_blocks":
        if n == 0:
            return None
        i, j = divmod(n - 1, LAYERS + 1)
        if j == LAYERS:
            return f"down_blocks.{i}.downsamplers.0.conv" if (k, rest) == (0, "op") else None
        return _block("down_blocks", i, j, k, rest)
    i, j = divmod(n, LAYERS + 1)
    if rest == "conv" and k in (1, 2) and j == LAYERS:  # an attention block has no child named conv
        return f"up_blocks.{i}.upsamplers.0.conv"
    return _block("up_blocks", i, j, k, rest)


def _block(where: str, i: int, j: int, k: int, rest: str) -> str | None:
    if k == 0:
        inner = _RESNET.get(rest)
        return f"{where}.{i}.resnets.{j}.{inner}" if inner else None
    return f"{where}.{i}.attentions.{j}.{rest}" if k == 1 else None


def to_original(path: str) -> list[str]:
    """The original-layout paths diffusers UNet module ``path`` may have (two for an upsampler, which follows an
    attention or not); [] for a path that is no UNet module."""
    if path in _TOP_BACK:
        return [_TOP_BACK[path]]
    match = _DIFFUSERS.fullmatch(path)
    if match is None:
        return []
    where, kind, j, rest = match["where"], match["kind"], int(match["j"]), match["rest"]
    inner = _RESNET_BACK.get(rest) if kind == "resnets" else rest
    if inner is None:
        return []
    if where == "mid_block":
        n = _MIDDLE_BACK.get(f"{kind}.{j}")
        return [f"middle_block.{n}.{inner}"] if n is not None and match["i"] is None else []
    if match["i"] is None:
        return []
    i = int(match["i"])
    if where == "down_blocks":
        if kind == "downsamplers":
            return [f"input_blocks.{(i + 1) * (LAYERS + 1)}.0.op"] if (j, rest) == (0, "conv") else []
        if kind == "upsamplers" or j >= LAYERS:
            return []
        return [f"input_blocks.{1 + i * (LAYERS + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"]
    last = i * (LAYERS + 1) + LAYERS
    if kind == "upsamplers":
        return [f"output_blocks.{last}.1.conv", f"output_blocks.{last}.2.conv"] if (j, rest) == (0, "conv") else []
    if kind == "downsamplers" or j > LAYERS:
        return []
    return [f"output_blocks.{i * (LAYERS + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"]
