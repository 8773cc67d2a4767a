"""pull against a hostile loopback Hub (issue 12): every attack refused with one HubError, nothing touched.

Each test plants a victim file and a sentinel directory beside the cache (the ``guard`` fixture) and
checks after the attack that the victim still holds its bytes and the sentinel its listing, and that
nothing but the cache and the (absent) output changed.  The real huggingface_hub client, our real
server on 127.0.0.1 and the real file system; no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

import loratools
from loratools import spec
from loratools.errors import HubError
from loratools.io.atomic import TEMP_PREFIX
from loratools.io.hubget import MAX_ATTEMPTS, MAX_REDIRECTS
from loratools.io.remote import evict
from loratools.io.tensorfile import read_header

from .fixtures import host, kohya_file
from .server import git_blob_sha

pytest_plugins = ["tests.hub.fixtures"]  # the hub, hub_server and adapter_dir fixtures

REPO = "me/tiny-lora"
VICTIM = b"the user's precious file\n"


class Guard:
    """A victim file and a sentinel directory outside the cache and the output, and a check that both are untouched."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.victim = root / "victim.txt"
        self.victim.write_bytes(VICTIM)
        self.sentinel = root / "sentinel"
        self.sentinel.mkdir()
        (self.sentinel / "keep.txt").write_text("keep", encoding="utf-8")
        self.blobs = root / "hf-home" / "hub" / "models--me--tiny-lora" / "blobs"
        self.before = self._outside()

    def _outside(self) -> dict[str, bytes]:
        """Every file under the test's root except the cache: path -> bytes."""
        found = {}
        for dirpath, _, files in os.walk(self.root):
            if Path(dirpath).is_relative_to(self.root / "hf-home"):
                continue
            for name in files:
                path = Path(dirpath) / name
                found[str(path.relative_to(self.root))] = path.read_bytes()
        return found

    def check(self) -> None:
        assert self.victim.read_bytes() == VICTIM and not self.victim.is_symlink()
        assert sorted(p.name for p in self.sentinel.iterdir()) == ["keep.txt"]
        assert self._outside() == self.before
        cached = [p for p in (self.blobs.iterdir() if self.blobs.exists() else []) if not p.name.startswith(TEMP_PREFIX)]
        assert all(len(p.name) in (40, 64) for p in cached)  # only our hash-named blobs, no leftovers
        assert not [p for p in (self.blobs.iterdir() if self.blobs.exists() else []) if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture
def pushed(hub, adapter_dir) -> str:
    return loratools.push(adapter_dir, REPO, endpoint=hub.url).commit_sha


@pytest.fixture
def guard(tmp_path: Path, pushed: str) -> Iterator[Guard]:
    g = Guard(tmp_path)
    yield g
    g.check()


def refused(hub, tmp_path: Path, match: str) -> HubError:
    """Pull into ``tmp_path/out`` expecting one HubError line matching ``match`` and no output."""
    with pytest.raises(HubError, match=match) as info:
        loratools.pull(REPO, out=tmp_path / "out", endpoint=hub.url)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    return info.value


# ----------------------------------------------------------------------------- item 1: names from the server


@pytest.mark.parametrize(
    "etag",
    ['"../../../../victim.txt"', "../../../../victim.txt", '"{sentinel}/planted"', '"../../../../sentinel/planted"', '"abc"', 'W/"../x"'],
)
@pytest.mark.parametrize("name", [spec.WEIGHTS_NAME, spec.CONFIG_NAME])
def test_etag_that_is_a_path_is_refused(hub, tmp_path, guard, etag, name):
    hub.state.etags[name] = etag.format(sentinel=guard.sentinel)
    refused(hub, tmp_path, "the Hub sent a malformed ETag .* refused")


def test_etag_that_contradicts_the_listing_is_refused(hub, tmp_path, guard):
    hub.state.etags[spec.WEIGHTS_NAME] = '"' + "0" * 64 + '"'
    refused(hub, tmp_path, "ETag .* contradicts its listing")


BAD_SHAS = ["../../x", "../../../../sentinel/x", "/{sentinel}/x", "g" * 40, "A" * 40, "a" * 39, "a" * 40 + "\n", "a" * 64, 7]


def test_lfs_etag_may_be_the_listed_blob_id(hub, tmp_path, guard, pushed):
    """The Hub may send an LFS file's git id (of its pointer) as ETag: it is in the listing, so it is accepted."""
    data = hub.state.repos[REPO].commits[pushed].files[spec.WEIGHTS_NAME]
    hub.state.etags[spec.WEIGHTS_NAME] = f'"{git_blob_sha(data)}"'
    pulled = loratools.pull(REPO, out=tmp_path / "out", endpoint=hub.url)
    assert (pulled.path / spec.WEIGHTS_NAME).read_bytes() == data
    guard.before = guard._outside()


@pytest.mark.parametrize("sha", BAD_SHAS)
def test_commit_sha_that_is_not_40_hex_is_refused_before_the_cache(hub, tmp_path, guard, sha):
    hub.state.commit_sha = sha.format(sentinel=guard.sentinel) if isinstance(sha, str) else sha
    refused(hub, tmp_path, "the Hub named the commit .*, not a 40-digit hex sha; refusing to download")
    assert not (tmp_path / "hf-home" / "hub").exists()  # nothing touched the cache
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "hf-home" / "x").exists()


def test_download_answered_for_another_commit_is_refused(hub, tmp_path, guard):
    hub.state.repo_commit = "../../../../sentinel"
    refused(hub, tmp_path, "the Hub answered for commit '../../../../sentinel', not [0-9a-f]{40}; refused")


def test_poisoned_cache_link_is_refused_offline_and_never_followed(hub, tmp_path, guard, pushed):
    """A snapshot link an older client made from a hostile ETag points at the victim: refused, victim kept."""
    loratools.pull(REPO, out=tmp_path / "good", endpoint=hub.url)
    guard.before = guard._outside()
    link = tmp_path / "hf-home" / "hub" / "models--me--tiny-lora" / "snapshots" / pushed / spec.WEIGHTS_NAME
    link.unlink()
    link.symlink_to(os.path.relpath(guard.victim, link.parent))
    with pytest.raises(HubError, match="the cached adapter_model.safetensors points outside the cache"):
        loratools.pull(REPO, out=tmp_path / "out", offline=True, endpoint=hub.url)
    assert not (tmp_path / "out").exists()


def test_eviction_unlinks_only_inside_the_cache(hub, tmp_path, guard, pushed):
    loratools.pull(REPO, out=tmp_path / "good", endpoint=hub.url)
    guard.before = guard._outside()
    snapshot = tmp_path / "hf-home" / "hub" / "models--me--tiny-lora" / "snapshots" / pushed
    (snapshot / spec.WEIGHTS_NAME).unlink()
    (snapshot / spec.WEIGHTS_NAME).symlink_to(guard.victim)  # absolute link out of the cache
    evict(snapshot)
    assert not (snapshot / spec.WEIGHTS_NAME).is_symlink() and not (snapshot / spec.CONFIG_NAME).exists()
    assert len(list(guard.blobs.iterdir())) == 1  # the config's blob went; the weights' own blob is a stray now, not followed


def test_evicting_a_snapshot_outside_the_cache_does_nothing(hub, tmp_path, guard):
    (guard.sentinel / spec.CONFIG_NAME).symlink_to(guard.victim)
    evict(guard.sentinel)
    (guard.sentinel / spec.CONFIG_NAME).unlink()


def test_a_revision_that_climbs_is_refused(hub, tmp_path, guard):
    with pytest.raises(HubError, match="is not a branch, tag or commit name"):
        loratools.pull(f"{REPO}@../../../../sentinel/x", out=tmp_path / "out", endpoint=hub.url)


# ----------------------------------------------------------------------------- item 6: redirects, listings


def test_redirect_loop_on_the_listing(hub, tmp_path, guard):
    hub.state.redirect_loop.add("api")
    refused(hub, tmp_path, "the Hub redirected too many times")


def test_redirect_loop_on_a_download(hub, tmp_path, guard):
    hub.state.redirect_loop.add("resolve")
    refused(hub, tmp_path, "the Hub redirects in a loop")
    assert sum("/resolve/" in r for r in hub.state.requests) <= 2 * (MAX_REDIRECTS + 1)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b"[]",
        b'{"sha": "%(sha)s", "siblings": {"adapter_config.json": 1}}',
        b'{"sha": "%(sha)s", "siblings": [{"name": "adapter_config.json"}]}',
        b'{"sha": "%(sha)s", "siblings": [{"rfilename": ["a"]}]}',
        b'{"sha": "%(sha)s", "siblings": [{"rfilename": 5}]}',
        b'{"sha": "%(sha)s", "siblings": [{"rfilename": "adapter_model.safetensors", "lfs": {"sha256": "00"}}]}',
        b'{"sha": "%(sha)s", "siblings": "everything"}',
        b'{"sha": "%(sha)s", "siblings": null}',
        b"\xff\xfe",
    ],
)
def test_malformed_listing_is_refused(hub, tmp_path, guard, pushed, body):
    hub.state.info_raw = body % {b"sha": pushed.encode()} if b"%(sha)s" in body else body
    refused(hub, tmp_path, r"malformed file listing|has no adapter_config.json|could not be read")


def _sibling(pushed_files: dict[str, bytes], name: str, **changes: object) -> dict:
    data = pushed_files[name]
    entry: dict = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    if name.endswith(".safetensors"):
        entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lfs": None, "blobId": None}, "states no size and hash"),
        ({"lfs": {"size": 10, "sha256": "../../../../victim.txt", "pointerSize": 1}}, "not a sha256 hex digest"),
        ({"lfs": {"size": -1, "sha256": "0" * 64, "pointerSize": 1}}, "states no size and hash"),
        ({"lfs": {"size": "10", "sha256": "0" * 64, "pointerSize": 1}}, "states no size and hash"),
        ({"lfs": None, "blobId": "/" + "a" * 39}, "not a git hex digest"),
        ({"lfs": {"size": 10, "sha256": "0" * 64, "pointerSize": 1}}, "ETag .* contradicts its listing"),
    ],
)
def test_listing_without_a_usable_hash_is_refused(hub, tmp_path, guard, pushed, changes, match):
    files = hub.state.repos[REPO].commits[pushed].files
    siblings = [_sibling(files, spec.CONFIG_NAME), _sibling(files, spec.WEIGHTS_NAME, **changes)]
    hub.state.info_raw = json.dumps({"id": REPO, "sha": pushed, "siblings": siblings}).encode()
    refused(hub, tmp_path, match)


# ----------------------------------------------------------------------------- item 9: every file verified


def test_file_without_loratools_checksum_is_verified_against_the_lfs_sha256(hub, tmp_path, guard, pushed):
    files = hub.state.repos[REPO].commits[pushed].files
    weights = files[spec.WEIGHTS_NAME]
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])
    header["__metadata__"].pop(spec.META_SHA256)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    plain = len(raw).to_bytes(8, "little") + raw + weights[8 + header_len :]
    hub.state.commit(REPO, "main", {spec.WEIGHTS_NAME: plain}, "no checksum")
    bad = bytearray(plain)
    bad[-1] ^= 0x01  # a valid file still: only the Hub's sha256 can tell
    hub.state.served[(REPO, spec.WEIGHTS_NAME)] = bytes(bad)
    refused(hub, tmp_path, "do not match the LFS sha256")

    hub.state.served.clear()
    loratools.pull(REPO, out=tmp_path / "plain", endpoint=hub.url)  # the honest file pulls fine
    assert spec.META_SHA256 not in read_header(tmp_path / "plain" / spec.WEIGHTS_NAME).metadata
    assert (tmp_path / "plain" / spec.WEIGHTS_NAME).read_bytes() == plain
    guard.before = guard._outside()


def test_more_bytes_than_listed_are_refused(hub, tmp_path, guard, pushed):
    files = hub.state.repos[REPO].commits[pushed].files
    hub.state.served[(REPO, spec.WEIGHTS_NAME)] = files[spec.WEIGHTS_NAME] + b"\0" * 4096
    refused(hub, tmp_path, "sent more than the .* bytes it listed")


# ----------------------------------------------------------------------------- item 8: stalls and errors


def test_stalled_download_gives_up_after_bounded_attempts(hub, tmp_path, guard, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.2)
    hub.state.stall.add(spec.WEIGHTS_NAME)
    refused(hub, tmp_path, rf"download was interrupted \(no data for 0.2 s, {MAX_ATTEMPTS} attempts\); nothing was written")
    assert sum(r.endswith(spec.WEIGHTS_NAME) for r in hub.state.requests if r.startswith("GET")) == MAX_ATTEMPTS


def test_server_error_is_one_line(hub, tmp_path, guard, pushed):
    hub.state.fail = (503, "Service Unavailable")
    refused(hub, tmp_path, r"the Hub answered HTTP 503 Service Unavailable; try again later")


# ----------------------------------------------------------------------------- issue 17: one file of a repo (pull --file)

LORAS = "me/sd-loras"
FILE = "styles/pixel.safetensors"


@pytest.fixture
def hosted(hub, tmp_path) -> bytes:
    """A repo holding two kohya files (one in a folder) and a README, as single-file LoRA repos do."""
    data = kohya_file(tmp_path / "pixel.safetensors").read_bytes()
    other = kohya_file(tmp_path / "other.safetensors", seed=2).read_bytes()
    host(hub, LORAS, {FILE: data, "other.safetensors": other, spec.CARD_NAME: b"# loras\n"})
    (tmp_path / "pixel.safetensors").unlink()
    (tmp_path / "other.safetensors").unlink()
    return data


def test_pull_file_writes_the_bytes_into_the_folder(hub, tmp_path, hosted):
    pulled = loratools.pull(LORAS, filename=FILE, out=tmp_path / "loras", endpoint=hub.url)
    assert pulled.path == tmp_path / "loras" / "pixel.safetensors" and pulled.files == (FILE,)
    assert pulled.path.read_bytes() == hosted
    assert pulled.commit_sha == hub.state.repos[LORAS].refs["main"]
    assert [r for r in hub.state.requests if "/resolve/" in r] == [f"GET /{LORAS}/resolve/{pulled.commit_sha}/{FILE}"]  # that file only
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["pixel.safetensors"]  # no temporaries left


def test_pull_file_reference_forms_agree(hub, tmp_path, hosted):
    sha = hub.state.repos[LORAS].refs["main"]
    a = loratools.pull(f"hf://{LORAS}/{FILE}", out=tmp_path / "a.safetensors", endpoint=hub.url)
    b = loratools.pull(f"{LORAS}@{sha}/{FILE}", out=tmp_path / "b", endpoint=hub.url)
    c = loratools.pull(LORAS, revision=sha, filename=FILE, out=tmp_path / "c", endpoint=hub.url)
    assert a.path == tmp_path / "a.safetensors" and a.path.read_bytes() == b.path.read_bytes() == c.path.read_bytes() == hosted
    assert b.revision == sha


def test_pull_file_into_a_folder_keeps_its_other_files(hub, tmp_path, hosted):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(b"not touched")
    (folder / spec.CONFIG_NAME).write_text('{"peft_type": "LORA"}', encoding="utf-8")  # a stray config beside it changes nothing
    loratools.pull(LORAS, filename=FILE, out=folder, endpoint=hub.url)
    assert (folder / "mine.safetensors").read_bytes() == b"not touched"
    with pytest.raises(loratools.OutputExistsError):
        loratools.pull(LORAS, filename=FILE, out=folder, endpoint=hub.url)
    assert loratools.pull(LORAS, filename=FILE, out=folder, force=True, endpoint=hub.url).path.read_bytes() == hosted


def test_pull_file_tampered_in_transit_is_refused_and_leaves_nothing(hub, tmp_path, hosted):
    bad = bytearray(hosted)
    bad[-1] ^= 0x01  # a valid kohya file still: only the Hub's sha256 can tell
    hub.state.served[(LORAS, FILE)] = bytes(bad)
    with pytest.raises(HubError, match=f"{FILE}: the downloaded bytes do not match the LFS sha256 [0-9a-f]{{64}}") as info:
        loratools.pull(LORAS, filename=FILE, out=tmp_path / "out", endpoint=hub.url)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    hub.state.served.clear()
    assert loratools.pull(LORAS, filename=FILE, out=tmp_path / "out", endpoint=hub.url).path.read_bytes() == hosted


def test_pull_file_that_fails_the_spec_is_refused_and_evicted(hub, tmp_path):
    half = kohya_file(tmp_path / "half.safetensors", **{"lora_unet_x.lora_up.weight": torch.zeros(8, 2)})  # an up without its down
    host(hub, LORAS, {"half.safetensors": half.read_bytes()})
    with pytest.raises((loratools.FormatError, loratools.InvalidAdapterError)) as info:
        loratools.pull(LORAS, filename="half.safetensors", out=tmp_path / "out", endpoint=hub.url)
    assert f"hf://{LORAS}@" in str(info.value) and str(tmp_path) not in str(info.value)  # named by the Hub, not the temporary
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "hf-home" / "hub" / "models--me--sd-loras" / "blobs").iterdir()) == []


def test_pull_file_not_in_the_repo_lists_what_it_holds(hub, tmp_path, hosted):
    with pytest.raises(HubError, match=rf"{LORAS}@main has no file 'pixel.safetensors'; it holds 'other.safetensors', '{FILE}'"):
        loratools.pull(LORAS, filename="pixel.safetensors", out=tmp_path / "out", endpoint=hub.url)
    assert not [r for r in hub.state.requests if "/resolve/" in r] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../victim.safetensors", "/abs/x.safetensors", "styles\\pixel.safetensors", "a//b.safetensors", "x.bin"])
def test_pull_file_hostile_names_are_refused_before_any_request(hub, tmp_path, hosted, name):
    with pytest.raises(loratools.ArgumentError, match="is refused"):
        loratools.pull(LORAS, filename=name, out=tmp_path / "out", endpoint=hub.url)
    assert hub.state.requests == [] and not (tmp_path / "out").exists()


def test_pull_file_contradicting_reference_is_refused(hub, tmp_path, hosted):
    with pytest.raises(loratools.ArgumentError, match="names the file 'other.safetensors' but --file says"):
        loratools.pull(f"{LORAS}/other.safetensors", filename=FILE, endpoint=hub.url)
    with pytest.raises(loratools.ArgumentError, match="names the revision 'dev' but --revision says 'main'"):
        loratools.pull(f"{LORAS}@dev", revision="main", filename=FILE, endpoint=hub.url)
    assert hub.state.requests == []


def test_pull_file_hostile_server_commit_and_etag_are_refused(hub, tmp_path, hosted):
    hub.state.repo_commit = "../../../../sentinel"
    with pytest.raises(HubError, match="answered for commit '../../../../sentinel'"):
        loratools.pull(LORAS, filename=FILE, out=tmp_path / "out", endpoint=hub.url)
    hub.state.repo_commit = None
    hub.state.etags[FILE] = '"../../victim"'
    with pytest.raises(HubError, match="malformed ETag"):
        loratools.pull(LORAS, filename=FILE, out=tmp_path / "out", endpoint=hub.url)
    assert not (tmp_path / "out").exists()


def test_pull_file_offline_reads_the_verified_cache(hub, tmp_path, hosted):
    loratools.pull(LORAS, filename=FILE, out=tmp_path / "a", endpoint=hub.url)
    before = len(hub.state.requests)
    offline = loratools.pull(LORAS, filename=FILE, out=tmp_path / "b", offline=True, endpoint=hub.url)
    assert len(hub.state.requests) == before and offline.path.read_bytes() == hosted
    with pytest.raises(HubError, match="the cached copy lacks other.safetensors; pull it again online"):
        loratools.pull(LORAS, filename="other.safetensors", out=tmp_path / "c", offline=True, endpoint=hub.url)


def test_pull_file_through_a_planted_folder_link_is_refused(hub, tmp_path, hosted):
    """A snapshot folder that is a symlink out of the cache (planted by hand or an older client) is never written through."""
    sha = hub.state.repos[LORAS].refs["main"]
    outside = tmp_path / "outside"
    outside.mkdir()
    snapshot = tmp_path / "hf-home" / "hub" / "models--me--sd-loras" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "styles").symlink_to(outside)
    with pytest.raises(HubError, match="leads outside the cache; refused"):
        loratools.pull(LORAS, filename=FILE, out=tmp_path / "out", endpoint=hub.url)
    assert list(outside.iterdir()) == [] and not (tmp_path / "out").exists()


def test_pull_file_with_url_characters_in_its_name(hub, tmp_path):
    name = "sets/my lora #2 (50%)?.safetensors"
    data = kohya_file(tmp_path / "k.safetensors").read_bytes()
    host(hub, LORAS, {name: data})
    assert loratools.pull(LORAS, filename=name, out=tmp_path / "out", endpoint=hub.url).path.read_bytes() == data
    assert loratools.validate(f"hf://{LORAS}/{name}").ok
