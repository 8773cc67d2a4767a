"""The Hub reference grammar (io/hubref.py): which references name a PEFT repo and which one file, and the file-name checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratools.errors import ArgumentError, HubError
from loratools.io.hubref import HubRef, check_filename, is_reference, parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://me/a", HubRef("me/a", None, None)),
        ("me/a@dev", HubRef("me/a", "dev", None)),
        ("hf://me/a@refs/pr/1", HubRef("me/a", "refs/pr/1", None)),  # no file: the whole rest is the revision
        ("hf://me/a@feature/x", HubRef("me/a", "feature/x", None)),
        ("hf://me/a/lora.safetensors", HubRef("me/a", None, "lora.safetensors")),
        ("hf://me/a/sub/dir/lora.safetensors", HubRef("me/a", None, "sub/dir/lora.safetensors")),
        ("hf://me/a@v2/lora.safetensors", HubRef("me/a", "v2", "lora.safetensors")),
        ("hf://me/a@v2/sub/lora.safetensors", HubRef("me/a", "v2", "sub/lora.safetensors")),  # REV ends at the first '/'
        ("hf://me/a@refs/pr/12/sub/lora.safetensors", HubRef("me/a", "refs/pr/12", "sub/lora.safetensors")),  # as huggingface_hub
        ("hf://me/a@refs/convert/parquet/x.safetensors", HubRef("me/a", "refs/convert/parquet", "x.safetensors")),
        ("hf://me/a@feature%2Fx/lora.safetensors", HubRef("me/a", "feature/x", "lora.safetensors")),  # percent-decoded
        ("hf://me/a@" + "0" * 40 + "/lora.safetensors", HubRef("me/a", "0" * 40, "lora.safetensors")),
        ("hf://me/a/x@1.safetensors", HubRef("me/a", None, "x@1.safetensors")),  # an '@' inside the path is literal
        ("hf://me/a@v1.safetensors", HubRef("me/a", "v1.safetensors", None)),  # no third segment: a revision
    ],
)
def test_parse(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["me", "hf://", "me/a@", "/abs/path", "hf://me/a/sub", "hf://me/a/model.bin", "hf://a b/c", "me@x"])
def test_non_references_are_hub_errors(text):
    with pytest.raises(HubError, match="is not a Hub adapter reference"):
        parse(text)


@pytest.mark.parametrize(
    "name",
    [
        "../up.safetensors",
        "sub/../../up.safetensors",
        "/etc/x.safetensors",
        "a//b.safetensors",
        "./x.safetensors",
        "a\\b.safetensors",
        "C:\\x.safetensors",
        "x\x1b[2J.safetensors",
        "x\0.safetensors",
        "model.bin",
        "weights.pt",
        ".safetensors",
        "sub/.safetensors",
        "",
    ],
)
def test_hostile_file_names_are_refused_before_any_request(name):
    with pytest.raises(ArgumentError, match="is refused") as info:
        check_filename(name)
    assert "\n" not in str(info.value)


def test_hostile_file_names_inside_a_reference():
    with pytest.raises(ArgumentError):
        parse("hf://me/a/../b.safetensors")
    with pytest.raises(ArgumentError):
        parse("hf://me/a@main/sub//x.safetensors")


@pytest.mark.parametrize("name", ["lora.safetensors", "sub/dir/a..b.safetensors", "my lora (v2).safetensors", "é.safetensors"])
def test_plain_names_pass(name):
    assert check_filename(name) == name


def test_str_round_trips_and_paths_are_local():
    for text in ("hf://me/a", "hf://me/a@dev", "hf://me/a@v2/sub/x.safetensors", "hf://me/a/x.safetensors"):
        assert str(parse(text)) == text
    assert is_reference("hf://me/a") and not is_reference("me/a")
    assert not is_reference(Path("hf://me/a"))
