"""vLLM: one ``lora_alpha / r`` from the config for every module; patterns are never read.

vllm ``vllm/lora/peft_helper.py`` (main, read 2026-12): ``PEFTHelper`` declares r, lora_alpha,
target_modules, bias, modules_to_save, use_rslora, use_dora and no rank/alpha pattern field;
``__post_init__`` sets ``vllm_lora_scaling_factor = lora_alpha / r`` (``/ math.sqrt(r)`` with
``use_rslora``), used for every module; ranks come from the tensors.  ``validate_legal`` refuses
``modules_to_save``, DoRA ("vLLM does not yet support DoRA"), ``bias != "none"`` and r above
``LoRAConfig.max_lora_rank`` (``vllm/config/lora.py``, default 16, ``--max-lora-rank``).
Not installable here: the rule is the quoted source, tested in tests/runtimes.
"""

from __future__ import annotations

from .. import spec
from .profile import Profile, View


def _scale(view: View) -> float:
    return spec.scaling(view.config_alpha, view.config_r, rslora=view.rslora)


VLLM = Profile(
    name="vllm",
    layout="peft",
    keys="base_model.model.<module>.lora_A.weight / .lora_B.weight (packed qkv/gate_up handled by vLLM)",
    rule="one lora_alpha/r from the config for every module (alpha/sqrt(r) with use_rslora)",
    scale=_scale,
    needs="scale",
    sources=("vllm vllm/lora/peft_helper.py PEFTHelper.__post_init__, validate_legal", "vllm vllm/config/lora.py max_lora_rank=16"),
    ignores=("rank_pattern", "alpha_pattern"),
    refuses={
        "dora": "refuses DoRA adapters (peft_helper.py: 'vLLM does not yet support DoRA')",
        "modules_to_save": "refuses modules_to_save (peft_helper.py: 'vLLM only supports modules_to_save being None')",
        "bias": "refuses LoRA biases (peft_helper.py validate_legal: bias must be 'none')",
    },
    max_rank=16,
    max_rank_hint="start vLLM with --max-lora-rank at least the adapter's rank",
)
