"""ComfyUI: ``alpha / rank`` per module from the file's ``.alpha``, DoRA's ``dora_scale`` applied.

ComfyUI ``comfy/weight_adapter/lora.py`` (master, read 2026-12) ``LoRAAdapter.calculate_weight``:
``alpha = v[2] / mat2.shape[0]`` (the file's ``.alpha`` over lora_down's rows, 1 when absent), and
``weight_decompose`` for ``dora_scale``.  Keys are kohya's (``comfy/lora.py`` ``model_lora_keys_unet``).
"""

from __future__ import annotations

from .kohya import KOHYA
from .profile import Profile

COMFYUI = Profile(
    name="comfyui",
    layout="kohya",
    keys=KOHYA.keys,
    rule=KOHYA.rule,
    scale=KOHYA.scale,
    needs="none",
    sources=("ComfyUI comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight", "ComfyUI comfy/lora.py model_lora_keys_unet"),
    refuses={k: v for k, v in KOHYA.refuses.items() if k != "dora"},
)
