"""SGLang: one ``lora_alpha / r`` for every module, ``use_rslora`` ignored.

sglang ``python/sglang/srt/lora/lora.py`` (main, read 2026-12): ``LoRAAdapter.__init__`` sets
``self.scaling = self.config.lora_alpha / self.config.r`` once per adapter; ``lora_config.py`` reads
r, lora_alpha and target_modules only, so ``use_rslora`` (an open SGLang report: rsLoRA adapters
too weak by sqrt(r)), ``rank_pattern`` and ``alpha_pattern`` have no effect.  It has no DoRA
magnitude or modules_to_save path, so those would be dropped silently.  Not installable here.
"""

from __future__ import annotations

from .profile import Profile, View


def _scale(view: View) -> float:
    return view.config_alpha / view.config_r


SGLANG = Profile(
    name="sglang",
    layout="peft",
    keys="base_model.model.<module>.lora_A.weight / .lora_B.weight",
    rule="one lora_alpha/r from the config for every module, use_rslora ignored",
    scale=_scale,
    needs="scale",
    sources=("sglang python/sglang/srt/lora/lora.py LoRAAdapter.__init__", "sglang python/sglang/srt/lora/lora_config.py"),
    ignores=("rank_pattern", "alpha_pattern", "use_rslora"),
    refuses={
        "dora": "ignores DoRA magnitudes (no lora_magnitude_vector path in srt/lora)",
        "modules_to_save": "ignores modules_to_save tensors",
        "bias": "ignores lora_B.bias",
    },
)
