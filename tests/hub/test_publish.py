"""push against a hostile loopback Hub (issue 12): the existing model card is read in memory, bounded.

The card is the one file push reads back from the Hub.  huggingface_hub's ``hf_hub_download`` would
name a cache blob after the server's ETag, so a hostile ETag could plant the card's bytes anywhere;
push now reads it with ``io.hubget.get_small`` into memory and nothing the server says names a path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import loratools
from loratools import spec
from loratools.errors import HubError
from loratools.hub.publish import CARD_LIMIT

pytest_plugins = ["tests.hub.fixtures"]  # the hub, hub_server and adapter_dir fixtures

REPO = "me/tiny-lora"


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("etag", ['"{root}/planted"', '"../../../../planted"', '"not-a-hash"'])
def test_hostile_card_etag_plants_nothing(hub, adapter_dir, tmp_path, etag):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    before = files_under(tmp_path)
    hub.state.etags[spec.CARD_NAME] = etag.format(root=tmp_path)
    with pytest.raises(HubError, match="malformed ETag") as info:
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
    assert "\n" not in str(info.value)
    assert files_under(tmp_path) == before and not (tmp_path / "planted").exists()


def test_oversized_card_is_refused_not_buffered(hub, adapter_dir):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.commit(REPO, "main", {spec.CARD_NAME: b"x" * (CARD_LIMIT + 1)}, "huge card")
    with pytest.raises(HubError, match=f"sent more than {CARD_LIMIT} bytes; refused"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)


def test_card_redirect_loop_is_refused(hub, adapter_dir):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.redirect_loop.add("resolve")
    with pytest.raises(HubError, match="redirects in a loop"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
