"""push against a hostile loopback Hub (issue 12): the existing model card is read in memory, bounded;
a single kohya file goes up as it is (issue 17); no push call waits on the Hub without a bound.

The card is the one file push reads back from the Hub.  huggingface_hub's ``hf_hub_download`` would
name a cache blob after the server's ETag, so a hostile ETag could plant the card's bytes anywhere;
push now reads it with ``io.hubget.get_small`` into memory and nothing the server says names a path.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import get_session

import loratools
from loratools import spec
from loratools.errors import HubError
from loratools.hub.card import BEGIN, END
from loratools.hub.publish import CARD_LIMIT
from loratools.io.atomic import TEMP_PREFIX
from loratools.io.hubget import ANSWER_FACTOR

from .fixtures import kohya_file

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


# ----------------------------------------------------------------------------- issue 17: a single file keeps its format


def test_push_of_a_kohya_file_uploads_its_bytes_and_pulls_back_identical(hub, tmp_path):
    src = kohya_file(tmp_path / "pixel.safetensors")
    before = src.read_bytes()
    pushed = loratools.push(src, REPO, endpoint=hub.url)
    assert pushed.files == ("pixel.safetensors", spec.CARD_NAME)
    files = hub.state.repos[REPO].resolve("main").files
    assert files["pixel.safetensors"] == before and spec.WEIGHTS_NAME not in files and spec.CONFIG_NAME not in files
    assert src.read_bytes() == before  # the input is never changed
    pulled = loratools.pull(REPO, filename="pixel.safetensors", out=tmp_path / "back", endpoint=hub.url)
    assert pulled.path.read_bytes() == before


def test_the_card_of_a_kohya_file_names_its_format_and_file(hub, tmp_path):
    loratools.push(kohya_file(tmp_path / "pixel.safetensors"), REPO, endpoint=hub.url)
    card = hub.state.repos[REPO].resolve("main").files[spec.CARD_NAME].decode()
    front, section = card.split("---")[1], card[card.index(BEGIN) : card.index(END)]
    assert "library_name: diffusers" in front and "library_name: peft" not in front
    assert "| format | kohya-ss (sd-scripts) LoRA, one .safetensors file |" in section
    assert f"loratools pull {REPO} --file pixel.safetensors" in section
    assert f'load_lora_weights("{REPO}", weight_name="pixel.safetensors")' in section
    assert "PeftModel" not in section and "spec version" not in section
    assert "| parameters | 120 |" in section and "PEFT type" not in section  # conv down 2x4x3x3 + up 8x2, linear down 2x8 + up 8x2


def test_a_kohya_push_over_a_peft_card_drops_library_name_peft_only_where_false(hub, tmp_path, adapter_dir):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    loratools.push(kohya_file(tmp_path / "pixel.safetensors"), REPO, endpoint=hub.url)
    card = hub.state.repos[REPO].resolve("main").files[spec.CARD_NAME].decode()
    assert "library_name: diffusers" in card and card.count(BEGIN) == 1


def test_push_format_original_of_a_peft_file_uploads_it_as_it_is(hub, tmp_path, make_adapter):
    single = make_adapter("single.safetensors")
    loratools.push(single, REPO, to="original", endpoint=hub.url)
    files = hub.state.repos[REPO].resolve("main").files
    assert files["single.safetensors"] == single.read_bytes() and spec.WEIGHTS_NAME not in files
    assert "library_name" not in files[spec.CARD_NAME].decode().split("---")[1]  # PEFT cannot load a bare file from a repo


def test_push_format_peft_of_a_kohya_file_converts_or_says_why_not(hub, tmp_path):
    with pytest.raises(loratools.SpecError, match="still has its kohya name"):
        loratools.push(kohya_file(tmp_path / "pixel.safetensors"), REPO, to="peft", endpoint=hub.url)
    assert REPO not in hub.state.repos  # refused before the Hub was asked for anything


def test_push_format_is_checked(hub, adapter_dir):
    with pytest.raises(loratools.ArgumentError, match="unknown push format 'kohya'; choose one of peft, original"):
        loratools.push(adapter_dir, REPO, to="kohya", endpoint=hub.url)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- push calls are bounded in time


def test_a_hub_that_never_answers_a_push_is_one_line_in_bounded_time(hub, adapter_dir, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.05)  # the answer bound is ANSWER_FACTOR x this: 0.3 s
    hub.state.silent.add("POST /api/repos/create")
    with pytest.raises(HubError, match=r"me/tiny-lora: the Hub did not answer in time \(ReadTimeout\); try again later") as info:
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
    assert "\n" not in str(info.value)
    assert get_session().timeout.read is None  # the shared client is as it was


def test_a_commit_that_is_never_answered_is_bounded_too(hub, adapter_dir, monkeypatch):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.05)
    hub.state.silent.add(f"POST /api/models/{REPO}/commit/main")
    with pytest.raises(HubError, match="did not answer in time"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)


def test_a_client_timeout_the_user_set_is_kept(hub, adapter_dir):
    client = get_session()
    client.timeout = httpx2.Timeout(30.0)
    try:
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
        assert client.timeout == httpx2.Timeout(30.0)
    finally:
        client.timeout = httpx2.Timeout(None)
    assert ANSWER_FACTOR * 10 == 60  # the default bound a commit may wait for its answer


def test_an_invalid_kohya_file_is_refused_naming_the_users_path(hub, tmp_path):
    src = kohya_file(tmp_path / "half.safetensors", **{"lora_unet_x.lora_up.weight": torch.zeros(8, 2)})
    with pytest.raises((loratools.InvalidAdapterError, loratools.FormatError)) as info:
        loratools.push(src, REPO, endpoint=hub.url)
    assert str(src) in str(info.value) and TEMP_PREFIX not in str(info.value)
    assert hub.state.requests == []
