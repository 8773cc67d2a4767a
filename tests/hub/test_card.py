"""The model card: our front matter keys and marked section change; everything else is the user's."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loratools.errors import FormatError
from loratools.hub.card import BEGIN, END, build_card, splice
from loratools.ops.summary import summarize

from ..factories import random_adapter


@pytest.fixture(scope="module")
def summary():
    adapter = random_adapter(2, rank=4, alpha=8.0)
    return summarize(adapter)


def test_fresh_card(summary):
    card = build_card(summary, repo_id="me/adapter")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: peft" in front and "- lora" in front and "- loratools" in front
    assert body.startswith("# adapter\n") and body.count(BEGIN) == 1 and body.count(END) == 1
    assert "| adapted modules | 2 |" in body and "| rank | 4 |" in body and "| alpha | 8 |" in body


def test_existing_card_keeps_its_prose_tags_and_license(summary):
    existing = "---\nlicense: mit\ntags:\n- mine\n---\n# My adapter\n\nHand-written notes.\n"
    card = build_card(summary, repo_id="me/adapter", existing=existing)
    assert "license: mit" in card and "- mine" in card and "- lora" in card and "Hand-written notes." in card
    again = build_card(summary, repo_id="me/adapter", existing=card)
    assert again == card  # pushing twice changes nothing


def test_splice_replaces_only_between_the_markers():
    assert splice(f"a\n{BEGIN}\nold\n{END}\nz\n", "NEW") == "a\nNEW\nz\n"
    assert splice("a\n", "NEW") == "a\n\nNEW\n"


def test_base_model_only_when_it_is_a_repo_id(summary):
    assert "base_model: meta-llama/Llama-3-8B" in build_card(replace(summary, base_model="meta-llama/Llama-3-8B"), repo_id="me/a")
    assert "base_model:" not in build_card(replace(summary, base_model="./local/llama"), repo_id="me/a")


def test_broken_front_matter_is_refused(summary):
    with pytest.raises(FormatError, match="front matter"):
        build_card(summary, repo_id="me/a", existing="---\n- a list\n---\ntext\n")
