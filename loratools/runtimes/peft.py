"""PEFT and transformers (which loads adapters through PEFT): the reference every other profile is measured against.

peft 0.21.2 ``tuners/lora/layer.py`` ``LoraLayer.update_layer``: ``scaling = lora_alpha / r`` (or
``/ sqrt(r)`` with ``use_rslora``), r and alpha per module from ``rank_pattern``/``alpha_pattern``
(``tuners/tuners_utils.py`` ``get_pattern_key``).  transformers ``integrations/peft.py``
``load_adapter`` builds the same ``LoraConfig`` and injects PEFT's layers, so it shares the rule.
"""

from __future__ import annotations

from .. import spec
from .profile import Profile, View


def _scale(view: View) -> float:
    return spec.scaling(view.alpha, view.rank, rslora=view.rslora)


PEFT = Profile(
    name="peft",
    layout="peft",
    keys="base_model.model.<module>.lora_A.weight / .lora_B.weight",
    rule="alpha/r per module from rank_pattern/alpha_pattern (alpha/sqrt(r) with use_rslora)",
    scale=_scale,
    needs="none",
    sources=("peft 0.21.2 tuners/lora/layer.py LoraLayer.update_layer", "peft 0.21.2 tuners/tuners_utils.py get_pattern_key"),
)

TRANSFORMERS = Profile(
    name="transformers",
    layout="peft",
    keys=PEFT.keys,
    rule=PEFT.rule,
    scale=_scale,
    needs="none",
    sources=("transformers integrations/peft.py PeftAdapterMixin.load_adapter (builds peft.LoraConfig)", *PEFT.sources),
)
