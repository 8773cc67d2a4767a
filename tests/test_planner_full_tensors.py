"""The planner's full-tensor rules on hand-made checkpoints: tied heads, trainable tokens, grown vocabularies, weights.

Tiny tensors with hand-checked values; tests/merging/test_full_tensors.py checks the same rules
against PEFT's logits on real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.adapter import Adapter
from loratools.io.checkpoint import open_checkpoint
from loratools.planner import plan

from .factories import random_module

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
Q = "model.layers.0.q"
SAVED = "base_model.model.model.embed_tokens.weight"
TOKENS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _checkpoint(tmp_path: Path, *, head: bool = False, tie: bool | None = None):
    tensors = {EMBED: torch.arange(12.0).reshape(4, 3), f"{Q}.weight": torch.zeros(6, 5)}
    if head:
        tensors[HEAD] = torch.ones(4, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    if tie is not None:
        (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": tie, "vocab_size": 4}))
    return open_checkpoint(tmp_path)


def _adapter(extras: dict[str, torch.Tensor], **config: object) -> Adapter:
    return Adapter({Q: random_module(6, 5, 2)}, {"target_modules": ["q"], **config}, extras)


def test_a_saved_embedding_on_a_tied_base_unties_the_head(tmp_path: Path) -> None:
    result = plan(_checkpoint(tmp_path, tie=True), [_adapter({SAVED: torch.full((4, 3), 7.0)})])
    assert result.ok and result.config == {"tie_word_embeddings": False}
    head = result.edits[HEAD]
    assert head.source == EMBED and head.replacement is None and not head.terms  # the head keeps the base embedding
    assert torch.equal(result.edits[EMBED].replacement, torch.full((4, 3), 7.0))


def test_equal_saved_embedding_and_head_stay_tied(tmp_path: Path) -> None:
    same = torch.full((4, 3), 7.0)
    result = plan(_checkpoint(tmp_path, tie=True), [_adapter({SAVED: same, "base_model.model.lm_head.weight": same.clone()})])
    assert result.ok and result.config == {} and HEAD not in result.edits


def test_trainable_tokens_on_a_tied_embedding_change_the_head_too(tmp_path: Path) -> None:
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    result = plan(_checkpoint(tmp_path, tie=True), [_adapter({TOKENS: rows}, trainable_token_indices=[2, 0])])
    assert result.ok and result.config == {} and HEAD not in result.edits  # both get the rows: still tied
    tokens = result.edits[EMBED].tokens
    assert tokens is not None and tokens.indices == (2, 0) and torch.equal(tokens.values, rows)


def test_untied_config_means_no_virtual_head(tmp_path: Path) -> None:
    result = plan(_checkpoint(tmp_path, tie=False), [_adapter({"base_model.model.lm_head.weight": torch.ones(4, 3)})])
    assert [p.code for p in result.problems] == ["saved-unmatched"]


def test_token_rows_must_match_their_indices(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, head=True)
    bad = plan(checkpoint, [_adapter({TOKENS: torch.ones(2, 3)}, trainable_token_indices=[1, 2, 3])])
    assert [p.code for p in bad.problems] == ["tokens-shape-mismatch"]
    out_of_range = plan(checkpoint, [_adapter({TOKENS: torch.ones(1, 3)}, trainable_token_indices=[4])])
    assert [p.code for p in out_of_range.problems] == ["tokens-shape-mismatch"]
    unnamed = plan(checkpoint, [_adapter({TOKENS: torch.ones(1, 3)}, trainable_token_indices={"wte": [1]})])
    assert [p.code for p in unnamed.problems] == ["tokens-unmatched"]


def test_grown_vocabulary_sets_vocab_size_and_needs_every_vocab_tensor(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, head=True)
    both = {SAVED: torch.ones(6, 3), "base_model.model.lm_head.weight": torch.ones(6, 3)}
    result = plan(checkpoint, [_adapter(both)])
    assert result.ok and result.config == {"vocab_size": 6} and result.edits[EMBED].shape == (6, 3)
    half = plan(checkpoint, [_adapter({SAVED: torch.ones(6, 3)})])
    assert [p.code for p in half.problems] == ["vocab-mismatch"]
    shrunk = plan(checkpoint, [_adapter({SAVED: torch.ones(3, 3)})])
    assert [p.code for p in shrunk.problems] == ["saved-shape-mismatch"]


def test_weights_and_conflicts_on_full_tensors(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, head=True)
    a, b = _adapter({SAVED: torch.ones(4, 3)}), _adapter({SAVED: torch.zeros(4, 3)})
    assert [p.code for p in plan(checkpoint, [a], weights=[0.5]).problems] == ["saved-weighted"]
    assert [p.code for p in plan(checkpoint, [a, b]).problems] == ["saved-conflict"]
    assert plan(checkpoint, [a, a]).ok  # identical copies agree whichever comes last
    t1 = _adapter({TOKENS: torch.ones(1, 3)}, trainable_token_indices=[1])
    t2 = _adapter({TOKENS: torch.ones(2, 3)}, trainable_token_indices=[2, 1])
    assert [p.code for p in plan(checkpoint, [t1, t2]).problems] == ["tokens-overlap"]
    assert [p.code for p in plan(checkpoint, [a, t1]).problems] == ["tokens-replaced"]
