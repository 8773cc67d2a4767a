"""kohya sd-scripts: ``alpha / rank`` per module from the file's own ``.alpha``.

sd-scripts ``networks/lora.py`` (main, read 2026-12) ``LoRAModule.__init__``: ``alpha = lora_dim if
alpha is None or 0``; ``self.scale = alpha / self.lora_dim``, per module, from ``<name>.alpha`` and
the ``lora_down`` rows.  Embeddings, lora_B biases and full tensors have no kohya form; plain
``networks.lora`` has no DoRA (``dora_scale`` is LyCORIS's).
"""

from __future__ import annotations

from .profile import Profile, View


def _scale(view: View) -> float:
    return view.file_alpha / view.rank


KOHYA = Profile(
    name="kohya",
    layout="kohya",
    keys="lora_unet_<flat>.lora_down.weight / .lora_up.weight / .alpha, lora_te[N]_ for text encoders",
    rule="each module's .alpha over its lora_down rank",
    scale=_scale,
    needs="none",
    sources=("sd-scripts networks/lora.py LoRAModule.__init__",),
    refuses={
        "dora": "ignores dora_scale (networks.lora has no DoRA)",
        "modules_to_save": "has no full-tensor form",
        "bias": "has no lora_B.bias",
        "embedding": "has no embedding LoRA",
    },
)
