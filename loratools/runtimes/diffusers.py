"""diffusers reading a kohya file: the most common alpha for attention modules.

diffusers 0.42.1 ``loaders/lora_conversion_utils.py`` ``_convert_kohya_lora_to_diffusers`` keeps
each ``.alpha`` in ``network_alphas`` and ``utils/peft_utils.py`` ``get_peft_kwargs`` builds one
``lora_alpha`` = the most common alpha (``collections.Counter(...).most_common()``) plus an
``alpha_pattern`` whose keys are rebuilt from the alpha names; for attention modules those keys do
not match the PEFT module names, so they get the most common alpha (the issue's measurement: after
``resize --energy 0.9`` UNet outputs off by 7-77%).  Uniform alphas are exact.
"""

from __future__ import annotations

from .kohya import KOHYA
from .profile import Profile, View

_ATTENTION = ("attn", "attention", "to_q", "to_k", "to_v", "to_out")


def _scale(view: View) -> float:
    alpha = view.common_alpha if any(part in view.name for part in _ATTENTION) else view.file_alpha
    return alpha / view.rank


DIFFUSERS = Profile(
    name="diffusers",
    layout="kohya",
    keys=KOHYA.keys + " (also diffusers' own unet./text_encoder. PEFT keys)",
    rule="the most common kohya alpha for attention modules, each module's own elsewhere",
    scale=_scale,
    needs="alpha",
    sources=("diffusers 0.42.1 utils/peft_utils.py get_peft_kwargs", "diffusers 0.42.1 loaders/lora_conversion_utils.py"),
    refuses={k: v for k, v in KOHYA.refuses.items() if k != "dora"},
)
