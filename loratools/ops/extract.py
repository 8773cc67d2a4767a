"""Extract a LoRA from two checkpoints: ΔW = W_tuned - W_base, truncated to rank r per module.

The classic tools form every ΔW and run a full SVD on it (O(m·n·min(m,n)) time, several dense
copies in memory).  Here each ΔW goes through a randomized range finder instead: Q spans ΔW·Ω for a
Gaussian Ω with r + p columns, sharpened by a few power iterations (ΔWᵀ, ΔW), then a small SVD of
QᵀΔW gives the top singular triplets.  That costs O(m·n·(r+p)) and, by Halko-Martinsson-Tropp, lands
within a few percent of the Eckart-Young optimum when the spectrum decays (power iterations make it
tight even for flat tails).  Tensors stream one pair at a time: checkpoints are read header-first and
each ΔW is dropped before the next is read.

Linear (2-D) and conv (4-D, flattened to out x in·kh·kw) weights become LoRA modules with the
balanced split B = U·√Σ, A = √Σ·Vᵀ and alpha = r (scale 1); a changed bias of such a module becomes
its ``lora_B.bias``.  Embeddings, norms and other 1-D tensors that changed cannot be low-rank: their
modules go to ``modules_to_save`` whole (or are skipped with ``skip_modules_to_save``).

Quantized checkpoints (an FP8 base or tuned model, :mod:`loratools.io.quant`) are read dequantized:
each claimed parameter is compared under its logical key in float32, its scales are never compared
on their own, and a tensor quantized in a format no codec reads is skipped, never diffed raw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import spec
from ..adapter import Adapter, LoraModule
from ..api import save_as
from ..compute import resolve_device
from ..errors import ArgumentError, ShapeError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.quant.registry import QuantMap, dequantized, logical_tensors, reader, scan

OVERSAMPLE = 10
POWER_ITERS = 2
_FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ExtractedModule:
    """One extracted module: its rank and how much of ‖ΔW‖²_F the rank-r factors keep."""

    module: str
    shape: tuple[int, ...]
    rank: int
    kept_energy: float  # Σ_{i<r} σᵢ² / ‖ΔW‖²_F
    delta_norm: float  # ‖ΔW‖_F


@dataclass(frozen=True)
class ExtractReport:
    """What :func:`extract` did: LoRA modules, modules saved whole, tensors skipped and why."""

    modules: list[ExtractedModule]
    saved: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def low_rank(
    M: torch.Tensor, rank: int, *, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``M`` (m x n) by a randomized range finder: ``(U (m x k), S (k,), Vh (k x n))``, k = min(rank, m, n).

    Falls back to an exact SVD when r + p reaches min(m, n), where sketching saves nothing.
    """
    m, n = M.shape
    width = min(rank + oversample, m, n)
    if width >= min(m, n):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    gen = torch.Generator(device=M.device).manual_seed(seed)
    Q = torch.linalg.qr(M @ torch.randn(n, width, generator=gen, device=M.device, dtype=M.dtype)).Q
    for _ in range(power_iters):  # re-orthonormalise each half-step so small singular values survive in float32
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub[:, :rank], S[:rank], Vh[:rank]


def choose_rank(S: torch.Tensor, total_energy: float, rank: int, energy: float | None) -> int:
    """The smallest k <= ``rank`` whose top-k singular values keep ``energy`` of ``total_energy`` (``rank`` if none)."""
    most = min(rank, int(S.numel()))
    if energy is None or total_energy == 0.0:
        return most
    reached = (torch.cumsum(S.double() ** 2, 0) / total_energy >= energy).nonzero()
    return min(int(reached[0]) + 1, most) if reached.numel() else most


def extract(
    base: str | Path,
    tuned: str | Path,
    *,
    rank: int,
    energy: float | None = None,
    out: str | Path | None = None,
    to: spec.Format = "peft",
    force: bool = False,
    skip_modules_to_save: bool = False,
    device: spec.Device = "auto",
) -> tuple[Adapter, ExtractReport]:
    """A LoRA of rank <= ``rank`` per module approximating ``tuned`` - ``base``; saved to ``out`` as ``to`` if given.

    ``energy`` (0 < E <= 1) lowers a module's rank to the smallest that keeps that fraction of
    ‖ΔW‖²_F.  Tensors unchanged between the checkpoints produce nothing.  Returns the adapter and a
    report of the kept energy per module, the modules saved whole and the tensors skipped.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ArgumentError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ArgumentError(f"energy must be in (0, 1], got {energy!r}")
    dev = resolve_device(device)
    base_ck, tuned_ck = open_checkpoint(base), open_checkpoint(tuned)
    base_q = scan(base_ck.model_config(), base_ck.tensors, reader(base_ck))
    tuned_q = scan(tuned_ck.model_config(), tuned_ck.tensors, reader(tuned_ck))
    base_info, tuned_info = logical_tensors(base_ck, base_q), logical_tensors(tuned_ck, tuned_q)
    lora_weights = {k for k, info in tuned_info.items() if _low_rankable(k, info.shape)}
    lora_modules = {k[: -len(".weight")] for k in lora_weights}
    modules: dict[str, LoraModule] = {}
    biases: dict[str, torch.Tensor] = {}
    rows: list[ExtractedModule] = []
    saved: dict[str, None] = {}
    skipped: dict[str, str] = {}
    for key, info in tuned_info.items():
        if key not in base_info:
            skipped[key] = "not in the base checkpoint"
            continue
        if tuple(base_info[key].shape) != tuple(info.shape):
            skipped[key] = f"shape {list(info.shape)} differs from the base's {list(base_info[key].shape)}"
            continue
        unread = tuned_q.unhandled.get(key) or base_q.unhandled.get(key)
        if unread is not None:
            skipped[key] = f"quantized ({unread}) in a format loratools cannot dequantize"
            continue
        W0, W1 = _read(base_ck, key, base_q), _read(tuned_ck, key, tuned_q)
        if not W1.is_floating_point() or torch.equal(W0, W1):
            continue
        owner = key.rsplit(".", 1)[0]
        if key in lora_weights:
            delta = W1.to(dev, torch.float32) - W0.to(dev, torch.float32)
            module, row = _factor(owner, delta, rank, energy, _out_dtype(W1))
            modules[owner] = module
            rows.append(row)
        elif key == owner + ".bias" and owner in lora_modules:
            biases[owner] = (W1.float() - W0.float()).to(_out_dtype(W1))
        elif skip_modules_to_save:
            skipped[key] = "changed, but cannot be low-rank (embedding, norm or 1-D) and modules_to_save is skipped"
        else:
            saved[owner] = None
        del W0, W1
    adapter = _assemble(modules, biases, list(saved), tuned_ck, skipped)
    if out is not None:
        save_as(adapter, out, to=to, force=force)
    return adapter, ExtractReport(rows, list(saved), skipped, str(dev))


def _low_rankable(key: str, shape: tuple[int, ...]) -> bool:
    """Linear and conv weights; embeddings (by name) are not, as PEFT saves them whole."""
    if not key.endswith(".weight") or len(shape) not in (2, 4):
        return False
    leaf = key[: -len(".weight")].rsplit(".", 1)[-1].lower()
    return "embed" not in leaf and leaf not in ("wte", "wpe", "shared")


def _read(checkpoint: Checkpoint, key: str, quant: QuantMap | None = None) -> torch.Tensor:
    if quant is not None and key in quant.params:
        return dequantized(checkpoint, quant.params[key])
    with safe_open(str(checkpoint.shard_of(key)), framework="pt") as fh:
        return fh.get_tensor(key)


def _out_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.dtype in _FLOAT_OUT else torch.float32


def _factor(name: str, delta: torch.Tensor, rank: int, energy: float | None, dtype: torch.dtype) -> tuple[LoraModule, ExtractedModule]:
    shape = tuple(delta.shape)
    M = delta.reshape(shape[0], -1)
    total = float(torch.sum(M.double() ** 2))
    U, S, Vh = low_rank(M, rank)
    k = choose_rank(S, total, rank, energy)
    root = S[:k].sqrt()
    B, A = (U[:, :k] * root).cpu(), (root[:, None] * Vh[:k]).cpu()
    kept = float(torch.sum(S[:k].double() ** 2)) / total
    if len(shape) == 4:
        A, B = A.reshape(k, *shape[1:]), B.reshape(shape[0], k, 1, 1)
    module = LoraModule(A.to(dtype).contiguous(), B.to(dtype).contiguous(), float(k), False, "conv" if len(shape) == 4 else "linear")
    return module, ExtractedModule(name, shape, k, min(kept, 1.0), total**0.5)


def _assemble(
    modules: dict[str, LoraModule], biases: dict[str, torch.Tensor], saved: list[str], tuned: Checkpoint, skipped: dict[str, str]
) -> Adapter:
    """The adapter: LoRA modules (with biases for all of them if any has one), saved modules' tensors from ``tuned``."""
    for name in [n for n in biases if n not in modules]:
        skipped[name + ".bias"] = "bias changed but the weight did not; no LoRA module to carry it"
        del biases[name]
    if biases:
        modules = {
            n: LoraModule(m.A, m.B, m.alpha, m.rslora, m.kind, None, biases.get(n, torch.zeros(m.B.shape[0], dtype=m.B.dtype)))
            for n, m in modules.items()
        }
    if not modules:
        raise ShapeError("the checkpoints differ in no linear or conv weight; there is nothing to extract")
    extras = {
        spec.PREFIX + key: _read(tuned, key)
        for key in tuned.tensors
        if key.rsplit(".", 1)[0] in saved and tuned.tensors[key].dtype in ("F32", "F16", "BF16")
    }
    config: dict[str, Any] = {"peft_type": "LORA"}
    if saved:
        config["modules_to_save"] = saved
    return Adapter(modules, config, extras, {})
