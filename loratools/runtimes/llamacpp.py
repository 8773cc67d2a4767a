"""llama.cpp: ``alpha / rank`` per tensor with one global alpha; rsLoRA and alpha_pattern ignored.

llama.cpp ``src/llama-adapter.h`` (master, read 2026-12) ``llama_adapter_lora_weight::get_scale``:
``scale = alpha ? adapter_scale * alpha / rank : adapter_scale`` with ``rank = b->ne[0]`` (the
tensor's) and ``alpha`` the file's one ``adapter.lora.alpha``.  ``convert_lora_to_gguf.py`` (commit
0b03adaa) writes ``adapter.lora.alpha = lparams["lora_alpha"]`` and reads neither ``use_rslora``
nor ``alpha_pattern``; it exits on any tensor that is not lora_A/lora_B (DoRA's
``lora_magnitude_vector``, ``lora_B.bias``, modules_to_save copies of embed_tokens/lm_head).
Not installable here: the rule is the quoted source, tested in tests/runtimes.
"""

from __future__ import annotations

from .profile import Profile, View


def _scale(view: View) -> float:
    return view.config_alpha / view.rank if view.config_alpha else 1.0


LLAMA_CPP = Profile(
    name="llama.cpp",
    layout="peft",
    keys="GGUF blk.N.<tensor>.weight.lora_a / .lora_b (convert_lora_to_gguf.py, or loratools convert --to gguf)",
    rule="one global adapter.lora.alpha over each tensor's rank; use_rslora and alpha_pattern ignored",
    scale=_scale,
    needs="alpha",
    sources=("llama.cpp src/llama-adapter.h llama_adapter_lora_weight::get_scale", "llama.cpp convert_lora_to_gguf.py @0b03adaa"),
    ignores=("rank_pattern", "alpha_pattern", "use_rslora"),
    refuses={
        "dora": "cannot apply DoRA (convert_lora_to_gguf.py exits on lora_magnitude_vector)",
        "modules_to_save": "cannot apply modules_to_save (convert_lora_to_gguf.py exits on full tensors)",
        "bias": "cannot apply lora_B.bias (convert_lora_to_gguf.py exits on it)",
        "conv": "has no convolution LoRA",
    },
)
