"""push/pull against our loopback Hub server with the real huggingface_hub client (no mocks)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import torch

import loratools
from loratools import spec
from loratools.errors import ChecksumError, HubError, InvalidAdapterError
from loratools.hub.card import BEGIN, END
from loratools.io.atomic import TEMP_PREFIX
from loratools.io.hubget import MAX_ATTEMPTS
from loratools.io.remote import is_unsafe, parse_ref

from .server import TOKEN

pytest_plugins = ["tests.hub.fixtures"]  # the hub, hub_server and adapter_dir fixtures

REPO = "me/tiny-lora"


def head_files(hub, repo_id: str = REPO, revision: str = "main") -> dict[str, bytes]:
    return hub.state.repos[repo_id].resolve(revision).files


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def downloads(hub) -> list[str]:
    return [r for r in hub.state.requests if "/resolve/" in r]


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("me/a", ("me/a", None)),
        ("hf://me/a", ("me/a", None)),
        ("me/a@dev", ("me/a", "dev")),
        ("hf://me/a@refs/pr/1", ("me/a", "refs/pr/1")),
    ],
)
def test_parse_ref(text, expected):
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["me", "me/a/b", "me/a@", "hf://", "/abs/path"])
def test_parse_ref_refuses_non_references(text):
    with pytest.raises(HubError, match="not a Hub adapter reference"):
        parse_ref(text)


@pytest.mark.parametrize("name", ["../evil.json", "a/../../x", "/etc/passwd", "C:\\x", "a//b", "\\\\server\\x", "./a"])
def test_unsafe_names(name):
    assert is_unsafe(name)


@pytest.mark.parametrize("name", ["adapter_config.json", "sub/dir/file.bin", "a..b", ".gitattributes"])
def test_safe_names(name):
    assert not is_unsafe(name)


# ----------------------------------------------------------------------------- push


def test_push_then_pull_round_trips_bytes_and_commit(hub, adapter_dir, tmp_path):
    pushed = loratools.push(adapter_dir, REPO, endpoint=hub.url)
    assert pushed.url == f"{hub.url}/{REPO}"
    assert pushed.commit_sha == hub.state.repos[REPO].refs["main"]
    assert pushed.files == (spec.CONFIG_NAME, spec.WEIGHTS_NAME, spec.CARD_NAME)
    remote = head_files(hub)
    for name in (spec.CONFIG_NAME, spec.WEIGHTS_NAME):
        assert remote[name] == (adapter_dir / name).read_bytes()

    pulled = loratools.pull(REPO, out=tmp_path / "copy", endpoint=hub.url)
    assert pulled.commit_sha == pushed.commit_sha
    assert sorted(p.name for p in pulled.path.iterdir()) == [spec.CONFIG_NAME, spec.WEIGHTS_NAME]
    for name in (spec.CONFIG_NAME, spec.WEIGHTS_NAME):
        assert (pulled.path / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert downloads(hub) and all(spec.CARD_NAME not in r for r in downloads(hub)[1:])  # the card is not fetched by pull


def test_push_writes_card_with_front_matter_and_summary(hub, adapter_dir):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    card = head_files(hub)[spec.CARD_NAME].decode()
    front = card.split("---")[1]
    assert "library_name: peft" in front
    assert "base_model: org/tiny-base" in front
    assert "- lora\n" in front and "- loratools\n" in front
    section = card[card.index(BEGIN) : card.index(END)]
    assert "| rank | 2 |" in section
    assert "| alpha | 4 |" in section
    assert "| parameters | 28 |" in section  # two modules of A 2x3 + B 4x2
    assert "| target modules | `q_proj`, `v_proj` |" in section
    assert "| spec version | 1.0 |" in section


def test_push_keeps_existing_card_and_updates_only_our_section(hub, adapter_dir, make_adapter):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    user_card = (
        "---\nlicense: mit\ntags:\n- my-tag\n---\n# My adapter\n\nHand-written notes.\n\n"
        f"{BEGIN}\nstale summary\n{END}\n\n## Training\n\nMore notes.\n"
    )
    hub.state.commit(REPO, "main", {spec.CARD_NAME: user_card.encode()}, "user edits card")
    loratools.push(make_adapter("v2", seed=3), REPO, endpoint=hub.url)
    card = head_files(hub)[spec.CARD_NAME].decode()
    assert "license: mit" in card and "- my-tag" in card and "- lora\n" in card
    assert "Hand-written notes." in card and "## Training\n\nMore notes." in card
    assert card.count(BEGIN) == 1 and card.count(END) == 1
    assert "stale summary" not in card and "| rank | 2 |" in card
    assert card.index("Hand-written notes.") < card.index(BEGIN) < card.index("## Training")


def test_push_prefers_the_adapters_own_card(hub, adapter_dir):
    (adapter_dir / spec.CARD_NAME).write_text("# Local card\n\nWritten next to the adapter.\n", encoding="utf-8")
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    card = head_files(hub)[spec.CARD_NAME].decode()
    assert card.startswith("---\n") and "Written next to the adapter." in card and BEGIN in card


def test_push_to_branch_and_pull_that_revision(hub, adapter_dir, tmp_path, make_adapter):
    main = loratools.push(adapter_dir, REPO, endpoint=hub.url)
    other = make_adapter("other", seed=1)
    branch = loratools.push(other, REPO, revision="exp", message="try seed 1", endpoint=hub.url)
    assert branch.revision == "exp" and branch.commit_sha != main.commit_sha
    assert hub.state.repos[REPO].refs == {"main": main.commit_sha, "exp": branch.commit_sha}
    assert hub.state.repos[REPO].commits[branch.commit_sha].message == "try seed 1"

    got = loratools.pull(f"{REPO}@exp", out=tmp_path / "exp", endpoint=hub.url)
    assert got.commit_sha == branch.commit_sha and got.revision == "exp"
    assert (got.path / spec.WEIGHTS_NAME).read_bytes() == (other / spec.WEIGHTS_NAME).read_bytes()
    by_sha = loratools.pull(REPO, revision=main.commit_sha, out=tmp_path / "pinned", endpoint=hub.url)
    assert (by_sha.path / spec.WEIGHTS_NAME).read_bytes() == (adapter_dir / spec.WEIGHTS_NAME).read_bytes()


def test_push_create_pr_leaves_main_alone(hub, adapter_dir, tmp_path, make_adapter):
    main = loratools.push(adapter_dir, REPO, endpoint=hub.url)
    pr = loratools.push(make_adapter("v2", seed=2), REPO, create_pr=True, endpoint=hub.url)
    assert pr.pr_url == f"{hub.url}/{REPO}/discussions/1" and pr.revision == "refs/pr/1"
    assert hub.state.repos[REPO].refs["main"] == main.commit_sha
    assert hub.state.repos[REPO].refs["refs/pr/1"] == pr.commit_sha


def test_push_private_creates_private_repo(hub, adapter_dir):
    loratools.push(adapter_dir, REPO, private=True, endpoint=hub.url)
    assert hub.state.repos[REPO].private


def test_push_bare_safetensors_file_as_peft_directory(hub, tmp_path, make_adapter):
    single = make_adapter("single.safetensors")
    loratools.push(single, REPO, endpoint=hub.url)
    pulled = loratools.pull(REPO, out=tmp_path / "dir", endpoint=hub.url)
    a, b = loratools.load(single), loratools.load(pulled.path)
    assert a.modules.keys() == b.modules.keys()
    assert all(torch.equal(a.modules[k].B, b.modules[k].B) for k in a.modules)


def test_push_refuses_invalid_adapter_before_any_request(hub, adapter_dir):
    config = adapter_dir / spec.CONFIG_NAME
    config.write_text(config.read_text().replace('"r": 2', '"r": 5'), encoding="utf-8")
    with pytest.raises(InvalidAdapterError, match="rank 2 but the config declares r=5") as info:
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
    assert len(info.value.problems) == 2  # one per module
    assert hub.state.requests == []


# ----------------------------------------------------------------------------- pull: integrity


def test_pull_of_file_tampered_after_listing_fails_the_lfs_sha256_and_leaves_nothing(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    good = head_files(hub)[spec.WEIGHTS_NAME]
    bad = bytearray(good)
    bad[-1] ^= 0x01  # one flipped bit in the last tensor value
    hub.state.served[(REPO, spec.WEIGHTS_NAME)] = bytes(bad)
    target = tmp_path / "copy"
    with pytest.raises(HubError, match="do not match the LFS sha256 [0-9a-f]{64} the Hub listed"):
        loratools.pull(REPO, out=target, endpoint=hub.url)
    assert not target.exists() and leftovers(tmp_path) == []

    hub.state.served.clear()  # the server heals: the bad bytes never entered the cache, so they are fetched again
    pulled = loratools.pull(REPO, out=target, endpoint=hub.url)
    assert (pulled.path / spec.WEIGHTS_NAME).read_bytes() == good


def test_pull_of_committed_file_with_wrong_checksum_fails_and_is_evicted(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    good = head_files(hub)[spec.WEIGHTS_NAME]
    bad = bytearray(good)
    bad[-1] ^= 0x01  # the Hub's own hash covers the bad bytes: only loratools.sha256 catches them
    hub.state.commit(REPO, "main", {spec.WEIGHTS_NAME: bytes(bad)}, "rot")
    target = tmp_path / "copy"
    with pytest.raises(ChecksumError, match="corrupt or was changed"):
        loratools.pull(REPO, out=target, endpoint=hub.url)
    assert not target.exists() and leftovers(tmp_path) == []
    blobs = tmp_path / "hf-home" / "hub" / "models--me--tiny-lora" / "blobs"
    assert list(blobs.iterdir()) == []  # both files evicted, so the next pull fetches them again

    hub.state.commit(REPO, "main", {spec.WEIGHTS_NAME: good}, "heal")
    assert (loratools.pull(REPO, out=target, endpoint=hub.url).path / spec.WEIGHTS_NAME).read_bytes() == good


@pytest.mark.parametrize("name", ["../escape.safetensors", "/tmp/absolute.json", "sub/../../up.json"])
def test_unsafe_listing_is_refused_and_nothing_written(hub, adapter_dir, tmp_path, name):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.unsafe_names.append(name)
    with pytest.raises(HubError, match="unsafe file name") as info:
        loratools.pull(REPO, out=tmp_path / "out" / "copy", endpoint=hub.url)
    assert repr(name) in str(info.value)
    assert downloads(hub) == [] or all("/resolve/main/README.md" in r for r in downloads(hub))
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/absolute.json").exists() and not (tmp_path / "escape.safetensors").exists()


def test_interrupted_download_leaves_nothing_and_retry_succeeds(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.truncate[spec.WEIGHTS_NAME] = MAX_ATTEMPTS  # every GET sends half the file, then closes
    target = tmp_path / "copy"
    with pytest.raises(HubError, match=r"download was interrupted \(.* bytes, 3 attempts\); nothing was written"):
        loratools.pull(REPO, out=target, endpoint=hub.url)
    assert not target.exists() and leftovers(tmp_path) == []
    assert hub.state.truncate[spec.WEIGHTS_NAME] == 0
    assert hub.state.ranges == [f"bytes={len(head_files(hub)[spec.WEIGHTS_NAME]) // 2}-"] * 2  # resumed, then resumed again

    pulled = loratools.pull(REPO, out=target, endpoint=hub.url)
    assert (pulled.path / spec.WEIGHTS_NAME).read_bytes() == (adapter_dir / spec.WEIGHTS_NAME).read_bytes()


def test_dropped_connection_is_retried_by_the_client(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.drop[spec.WEIGHTS_NAME] = 1  # half the declared bytes, then the connection breaks
    pulled = loratools.pull(REPO, out=tmp_path / "copy", endpoint=hub.url)
    assert hub.state.drop[spec.WEIGHTS_NAME] == 0
    assert sum(r.startswith("GET") and r.endswith(spec.WEIGHTS_NAME) for r in hub.state.requests) == 2
    assert (pulled.path / spec.WEIGHTS_NAME).read_bytes() == (adapter_dir / spec.WEIGHTS_NAME).read_bytes()


def test_server_answers_range_requests_with_206(hub, adapter_dir):
    pushed = loratools.push(adapter_dir, REPO, endpoint=hub.url)
    data = head_files(hub)[spec.WEIGHTS_NAME]
    request = urllib.request.Request(f"{hub.url}/{REPO}/resolve/{pushed.commit_sha}/{spec.WEIGHTS_NAME}", headers={"Range": "bytes=100-"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert response.read() == data[100:]


def test_pull_refuses_existing_output_without_force(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    target = tmp_path / "copy"
    target.mkdir()
    with pytest.raises(loratools.OutputExistsError):
        loratools.pull(REPO, out=target, endpoint=hub.url)
    assert downloads(hub) == [f"GET /{REPO}/resolve/main/README.md"]  # from the push only
    assert loratools.pull(REPO, out=target, force=True, endpoint=hub.url).path == target
    assert (target / spec.WEIGHTS_NAME).exists()


def test_pull_default_output_is_named_after_the_repo(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    pulled = loratools.pull(REPO, endpoint=hub.url)
    assert pulled.path == tmp_path / "tiny-lora"  # the fixture's cwd is tmp_path


def test_pull_of_repo_without_adapter_files(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.repos["me/empty"] = hub.state.repos.pop(REPO)
    hub.state.repos["me/empty"].commits[hub.state.repos["me/empty"].refs["main"]].files.pop(spec.WEIGHTS_NAME)
    with pytest.raises(HubError, match="has no adapter_model.safetensors; it is not a PEFT adapter repo"):
        loratools.pull("me/empty", out=tmp_path / "x", endpoint=hub.url)


# ----------------------------------------------------------------------------- pull: offline


def test_offline_pull_uses_cache_without_contacting_the_server(hub, adapter_dir, tmp_path, monkeypatch):
    pushed = loratools.push(adapter_dir, REPO, endpoint=hub.url)
    loratools.pull(REPO, out=tmp_path / "online", endpoint=hub.url)
    before = len(hub.state.requests)
    offline = loratools.pull(REPO, out=tmp_path / "offline", offline=True, endpoint=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_env = loratools.pull(REPO, out=tmp_path / "by-env", endpoint=hub.url)
    assert len(hub.state.requests) == before
    assert offline.offline and by_env.offline
    assert offline.commit_sha == by_env.commit_sha == pushed.commit_sha
    assert (offline.path / spec.WEIGHTS_NAME).read_bytes() == (adapter_dir / spec.WEIGHTS_NAME).read_bytes()


def test_offline_pull_without_cache_says_so(hub, tmp_path):
    with pytest.raises(HubError, match="not in the local cache and offline mode is on"):
        loratools.pull(REPO, out=tmp_path / "x", offline=True, endpoint=hub.url)
    assert hub.state.requests == [] and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- errors


def test_401_without_token_says_how_to_log_in(hub, adapter_dir, tmp_path):
    hub.state.token = TOKEN
    with pytest.raises(HubError, match=r"requires authentication \(HTTP 401\) and no token was found; log in with `hf auth login`") as info:
        loratools.pull(REPO, out=tmp_path / "x", endpoint=hub.url)
    assert "HF_TOKEN" in str(info.value) and "--token" in str(info.value)
    with pytest.raises(HubError, match="no token was found"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)


def test_401_names_the_rejected_token_source(hub, adapter_dir, tmp_path, monkeypatch):
    hub.state.token = TOKEN
    with pytest.raises(HubError, match=r"the token given with --token was rejected \(HTTP 401\)"):
        loratools.push(adapter_dir, REPO, token="hf_wrong", endpoint=hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_too")
    with pytest.raises(HubError, match=r"the token in HF_TOKEN was rejected") as info:
        loratools.pull(REPO, out=tmp_path / "x", endpoint=hub.url)
    assert "hf_wrong_too" not in str(info.value)


def test_right_token_works_from_argument_and_environment(hub, adapter_dir, tmp_path, monkeypatch):
    hub.state.token = TOKEN
    pushed = loratools.push(adapter_dir, REPO, token=TOKEN, endpoint=hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert loratools.pull(REPO, out=tmp_path / "x", endpoint=hub.url).commit_sha == pushed.commit_sha
    assert set(hub.state.auth_headers) == {f"Bearer {TOKEN}"}


def test_403_read_only_token_cannot_push(hub, adapter_dir):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.token, hub.state.read_only_token = TOKEN, "hf_readonly"
    with pytest.raises(
        HubError, match=r"the token given with --token is not allowed to do this \(HTTP 403\); use a token with write access"
    ):
        loratools.push(adapter_dir, REPO, token="hf_readonly", endpoint=hub.url)


def test_card_rejected_by_the_hub(hub, adapter_dir):
    hub.state.yaml_errors.append('"base_model" must be a valid model id')
    with pytest.raises(HubError, match=r"rejected the model card's front matter \(\"base_model\" must be a valid model id\)"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)
    assert len(hub.state.repos[REPO].commits) == 1  # only the repo's initial commit


def test_broken_local_card_is_refused(hub, adapter_dir):
    (adapter_dir / spec.CARD_NAME).write_text("---\n- just\n- a list\n---\ntext\n", encoding="utf-8")
    with pytest.raises(loratools.FormatError, match="front matter is not a valid mapping"):
        loratools.push(adapter_dir, REPO, endpoint=hub.url)


def test_404_repo_and_revision(hub, adapter_dir, tmp_path):
    with pytest.raises(HubError, match="repository me/missing not found on the Hub"):
        loratools.pull("me/missing", out=tmp_path / "x", endpoint=hub.url)
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    with pytest.raises(HubError, match=r"me/tiny-lora has no revision 'nope' \(no such branch, tag or commit\)"):
        loratools.pull(f"{REPO}@nope", out=tmp_path / "x", endpoint=hub.url)
    assert not (tmp_path / "x").exists()


def test_gated_repo(hub, adapter_dir, tmp_path):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    hub.state.repos[REPO].gated = True
    with pytest.raises(HubError, match="is a gated repo: request access on its Hub page"):
        loratools.pull(REPO, out=tmp_path / "x", endpoint=hub.url)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_network_down(hub, adapter_dir, tmp_path):
    down = _closed_port_url()
    with pytest.raises(HubError, match=r"cannot reach the Hub \(ConnectError\); check the network, or use --offline"):
        loratools.pull(REPO, out=tmp_path / "x", endpoint=down)
    with pytest.raises(HubError, match="cannot reach the Hub"):
        loratools.push(adapter_dir, REPO, endpoint=down)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- hf:// paths


def test_hf_uri_is_accepted_wherever_a_path_is(hub, adapter_dir, tmp_path, make_adapter):
    loratools.push(adapter_dir, REPO, endpoint=hub.url)
    loratools.push(make_adapter("other", seed=1), REPO, revision="exp", endpoint=hub.url)
    local = loratools.load(adapter_dir)
    remote = loratools.load(f"hf://{REPO}")
    assert all(torch.equal(local.modules[k].A, remote.modules[k].A) for k in local.modules)
    assert loratools.validate(f"hf://{REPO}@exp").ok
    other = loratools.load(f"hf://{REPO}@exp")
    assert not torch.equal(other.modules["model.layers.0.self_attn.q_proj"].A, local.modules["model.layers.0.self_attn.q_proj"].A)
