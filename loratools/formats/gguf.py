"""llama.cpp GGUF LoRA export: one ``.gguf`` adapter that llama.cpp applies exactly.

Conventions follow llama.cpp's ``convert_lora_to_gguf.py`` (commit 0b03adaa) and the ``gguf``
package its authors maintain (names and keys from ``gguf.constants``/``gguf.tensor_mapping``):
``general.type = "adapter"``, ``adapter.type = "lora"``, one float32 ``adapter.lora.alpha``,
``general.architecture`` the base's; per module ``blk.N.<tensor>.weight.lora_a`` (numpy shape
r x in, ggml ne [in, r]) and ``.lora_b`` (out x r, ne [r, out]: ``rank = b->ne[0]``).

llama.cpp scales each tensor by ``alpha / rank`` with the one file alpha and ignores ``use_rslora``
and ``alpha_pattern`` (:mod:`loratools.runtimes.llamacpp`), so the adapter is first rewritten by
:func:`~loratools.runtimes.check.conform` for ``llama.cpp``: one alpha, every scale folded into
lora_b.  Llama-family bases (Llama, Mistral) store q/k rows permuted for GGML's RoPE
(``LlamaModel.permute`` in ``convert_hf_to_gguf.py``), so lora_b of q_proj/k_proj is permuted the
same way.  DoRA, modules_to_save, lora_B.bias, conv and embedding LoRA are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import ArgumentError, DependencyError, FormatError
from ..io.atomic import atomic_output
from ..runtimes.check import conform

# HF architecture -> (gguf MODEL_ARCH member name, whether q/k rows are permuted as LlamaModel does).
# convert_hf_to_gguf.py registers Llama and Mistral under LlamaModel (undo_permute); Qwen2/3,
# Gemma2/3 and Phi3 use NEOX RoPE and keep HF's row order.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
    "Gemma3ForConditionalGeneration": ("GEMMA3", False),
    "Phi3ForCausalLM": ("PHI3", False),
}
_LM_PREFIXES = (("model.language_model.", "model."), ("language_model.", ""))  # as convert_lora_to_gguf.py strips them


def base_config(base: str | Path) -> dict[str, Any]:
    """The base model's ``config.json``: ``base`` is a model directory, that file, or a checkpoint beside it."""
    path = Path(base)
    candidates = [path] if path.name == "config.json" else [path / "config.json", path.parent / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise FormatError(f"cannot read the base config ({err})", path=candidate) from None
            if not isinstance(config, dict):
                raise FormatError("the base config is not a JSON object", path=candidate)
            return config
    raise FormatError("no config.json for the base model; GGUF export needs it to name the architecture and tensors", path=base)


def write(adapter: Adapter, path: Path, *, force: bool, base: str | Path | None = None) -> Path:
    """Write ``adapter`` as a llama.cpp GGUF LoRA at ``path`` (atomic); ``base`` names the architecture."""
    if base is None:
        raise ArgumentError("a GGUF export needs the base model (--base DIR with its config.json) to name the tensors")
    if path.suffix != ".gguf":
        raise ArgumentError("a GGUF output is a single file; give it a .gguf name", path=path)
    gguf = _gguf()
    config = base_config(base)
    text = config.get("text_config") or {}
    arch_name = (text.get("architectures") or config.get("architectures") or ["?"])[0]
    if arch_name not in ARCHITECTURES:
        raise FormatError(f"base architecture {arch_name!r} is not exported to GGUF; supported: {', '.join(ARCHITECTURES)}", path=base)
    member, permuted = ARCHITECTURES[arch_name]
    hparams = {**config, **text}
    arch = gguf.MODEL_ARCH[member]
    names = gguf.get_tensor_name_map(arch, int(hparams["num_hidden_layers"]))
    adapter = _refuse(adapter)
    exact = conform(adapter, ("llama.cpp",))
    alphas = {m.alpha for m in exact.modules.values()}
    (alpha,) = alphas  # conform gives every module one alpha
    writer_tensors: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for module, m in exact.modules.items():
        hf = module
        for prefix, repl in _LM_PREFIXES:
            if hf.startswith(prefix):
                hf = repl + hf[len(prefix) :]
                break
        target = names.get_name(hf)
        if target is None:
            raise FormatError(f"no {gguf.MODEL_ARCH_NAMES[arch]} GGUF tensor for this module", key=module)
        B = m.B.float()
        if permuted and hf.endswith(("q_proj", "k_proj")):
            heads = int(hparams["num_attention_heads"])
            if hf.endswith("k_proj"):
                heads = int(hparams.get("num_key_value_heads") or heads)
            B = B.reshape(heads, 2, B.shape[0] // heads // 2, B.shape[1]).swapaxes(1, 2).reshape(B.shape)
        writer_tensors.append((target + ".weight", m.A, B.to(m.B.dtype) if m.B.dtype == torch.float16 else B))
    with atomic_output(path, force=force, directory=False) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, A, B in writer_tensors:
            writer.add_tensor(name + ".lora_a", _numpy(A))
            writer.add_tensor(name + ".lora_b", _numpy(B))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def write_gguf(adapter: Adapter, path: str | Path, *, base: str | Path, force: bool = False) -> Path:
    """Export ``adapter`` to a llama.cpp GGUF LoRA at ``path`` for the model whose ``config.json`` ``base`` holds."""
    return write(adapter, Path(path), force=force, base=base)


def _refuse(adapter: Adapter) -> Adapter:
    """``adapter`` if llama.cpp can apply every part of it; else one line naming the first part it cannot."""
    if adapter.extra_tensors:
        key = next(iter(adapter.extra_tensors))
        raise FormatError("llama.cpp cannot apply modules_to_save (full tensors); drop them or merge the adapter instead", key=key)
    for name, m in adapter.modules.items():
        what = (
            "DoRA (lora_magnitude_vector)"
            if m.magnitude is not None
            else "lora_B.bias"
            if m.bias is not None
            else f"{m.kind} LoRA"
            if m.kind != "linear"
            else None
        )
        if what:
            raise FormatError(f"llama.cpp cannot apply {what}; the GGUF export holds linear LoRA only", key=name)
    return adapter


def _numpy(t: torch.Tensor) -> Any:
    t = t.detach().contiguous()
    return (t if t.dtype in (torch.float16, torch.float32) else t.float()).numpy()


def _gguf() -> Any:
    try:
        import gguf  # optional: the llama.cpp authors' writer
    except ImportError:
        raise DependencyError("GGUF export needs the gguf package: pip install 'loratools[gguf]'") from None
    return gguf
