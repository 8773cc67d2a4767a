"""LyCORIS layouts, which are not plain LoRA: recognised by their tensor names and refused, in one place.

LoHa (Hadamard product of two low-rank pairs), LoKr (Kronecker product) and LoCon/Tucker conv
factors (``lora_mid``) have no single B·A factorisation, so reading one as LoRA would be wrong.
"""

from __future__ import annotations

from ..errors import FormatError
from ..io.tensorfile import Header

_LAYOUTS = (
    (("hada_w1", "hada_w2"), "a LyCORIS LoHa adapter (hada_* tensors)", "LoHa is not LoRA: it has no B·A factorisation loratools can use"),
    (("lokr_w1", "lokr_w2"), "a LyCORIS LoKr adapter (lokr_* tensors)", "LoKr is not LoRA: it has no B·A factorisation loratools can use"),
    (
        (".lora_mid.",),
        "a LyCORIS LoCon/Tucker adapter (lora_mid tensors)",
        "its conv factors are not a plain up·down product; loratools reads plain LoRA only",
    ),
)


def refuse(header: Header) -> None:
    """Raise :class:`FormatError` (code ``foreign-format``) naming the layout if ``header`` is a LyCORIS file."""
    for needles, what, why in _LAYOUTS:
        key = next((name for name in header.tensors if any(n in name for n in needles)), None)
        if key is not None:
            raise FormatError(f"this is {what}; {why}", path=header.path, key=key, code="foreign-format")
