"""`loratools push` / `pull` and hf:// arguments through the CLI, against the loopback Hub server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import constants

from loratools import spec
from loratools.cli import EXIT_HUB, EXIT_INPUT, EXIT_USAGE, main

from ..hub.fixtures import host, kohya_file, sd_base
from ..hub.server import TOKEN

pytest_plugins = ["tests.hub.fixtures"]  # the hub, hub_server and adapter_dir fixtures

REPO = "me/tiny-lora"


@pytest.fixture
def run(hub, monkeypatch):
    """Invoke the CLI with HF_ENDPOINT's place taken by the fixture (the CLI has no --endpoint)."""
    monkeypatch.delenv("LORATOOLS_DEBUG", raising=False)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    return invoke


def test_push_prints_url_and_commit(run, hub, adapter_dir):
    result = run("push", str(adapter_dir), REPO, "-m", "first")
    sha = hub.state.repos[REPO].refs["main"]
    assert f"{hub.url}/{REPO}" in result.stdout and f"commit: {sha}" in result.stdout
    assert hub.state.repos[REPO].commits[sha].message == "first"


def test_push_and_pull_json(run, hub, adapter_dir, tmp_path):
    pushed = json.loads(run("push", str(adapter_dir), REPO, "--revision", "dev", "--json").stdout)
    assert pushed["revision"] == "dev" and pushed["commit_sha"] == hub.state.repos[REPO].refs["dev"]
    pulled = json.loads(run("pull", f"{REPO}@dev", "-o", str(tmp_path / "copy"), "--json").stdout)
    assert pulled["commit_sha"] == pushed["commit_sha"] and pulled["path"] == str(tmp_path / "copy")
    assert (tmp_path / "copy" / spec.WEIGHTS_NAME).read_bytes() == (adapter_dir / spec.WEIGHTS_NAME).read_bytes()


def test_pull_refuses_existing_dir_unless_force(run, adapter_dir, tmp_path):
    run("push", str(adapter_dir), REPO)
    (tmp_path / "copy").mkdir()
    result = run("pull", REPO, "-o", str(tmp_path / "copy"), code=EXIT_INPUT)
    assert "already exists; pass --force" in result.stderr
    run("pull", REPO, "-o", str(tmp_path / "copy"), "--force")
    assert (tmp_path / "copy" / spec.CONFIG_NAME).exists()


def test_pull_offline_flag(run, hub, adapter_dir, tmp_path):
    run("push", str(adapter_dir), REPO)
    run("pull", REPO, "-o", str(tmp_path / "a"))
    before = len(hub.state.requests)
    result = run("pull", REPO, "-o", str(tmp_path / "b"), "--offline")
    assert len(hub.state.requests) == before and "commit: " in result.stdout


def test_push_of_invalid_adapter_exits_3_with_one_line(run, hub, adapter_dir):
    (adapter_dir / spec.WEIGHTS_NAME).write_bytes(b"\x00" * 7)
    result = run("push", str(adapter_dir), REPO, code=EXIT_INPUT)
    assert result.stderr.count("\n") == 1 and "error:" in result.stderr
    assert hub.state.requests == []


def test_hub_errors_exit_4_with_one_line(run, tmp_path):
    result = run("pull", "me/missing", "-o", str(tmp_path / "x"), code=EXIT_HUB)
    assert (
        result.stderr.strip() == "error: repository me/missing not found on the Hub (check the name; if it is private, "
        "log in with `hf auth login` (or `huggingface-cli login`), set HF_TOKEN, or pass --token)"
    )


def test_token_never_appears_in_output_or_logs(run, hub, adapter_dir, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    hub.state.token = TOKEN
    ok = run("push", str(adapter_dir), REPO, "--token", TOKEN)
    denied = run("pull", REPO, "-o", str(tmp_path / "x"), "--token", TOKEN + "x", code=EXIT_HUB)
    assert "the token given with --token was rejected" in denied.stderr
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    missing = run("pull", "me/missing", "-o", str(tmp_path / "y"), code=EXIT_HUB)
    pulled = run("pull", REPO, "-o", str(tmp_path / "z"), "--json")
    assert f"Bearer {TOKEN}" in hub.state.auth_headers  # it was used ...
    for result in (ok, denied, missing, pulled):
        assert TOKEN not in result.output  # ... and never shown
    assert any(r.name.startswith("huggingface_hub") and r.levelno == logging.DEBUG for r in caplog.records)  # requests were logged
    assert TOKEN not in caplog.text


def test_hf_uri_in_validate_and_inspect(run, adapter_dir):
    run("push", str(adapter_dir), REPO)
    assert "valid" in run("validate", f"hf://{REPO}").stdout
    summary = json.loads(run("inspect", f"hf://{REPO}@main", "--json").stdout)
    assert summary["num_params"] == 28 and summary["base_model"] == "org/tiny-base"


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_hf_uri_of_missing_repo_is_a_hub_error(run, command):
    result = run(command, "hf://me/missing", code=EXIT_HUB)
    assert "repository me/missing not found" in result.stderr


@pytest.mark.slow  # three fresh interpreters importing torch
def test_installed_command_reads_endpoint_and_offline_from_the_environment(hub, adapter_dir, tmp_path):
    """A fresh process: huggingface_hub configured only by HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE, as users do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_XET="1", PYTHONPATH=str(Path(__file__).parents[1]))

    def cli(*args: str, **extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "loratools", *args], env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    pushed = json.loads(cli("push", str(adapter_dir), REPO, "--json"))
    assert pushed["commit_sha"] == hub.state.repos[REPO].refs["main"]
    assert f"commit: {pushed['commit_sha']}" in cli("pull", REPO, "-o", str(tmp_path / "a"))
    served = len(hub.state.requests)
    assert f"commit: {pushed['commit_sha']}" in cli("pull", REPO, "-o", str(tmp_path / "b"), HF_HUB_OFFLINE="1")
    assert len(hub.state.requests) == served


# ----------------------------------------------------------------------------- a hostile Hub (issue 12)


def test_hostile_etag_exits_4_with_one_line_and_the_victim_survives(run, hub, adapter_dir, tmp_path):
    run("push", str(adapter_dir), REPO)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    hub.state.etags[spec.WEIGHTS_NAME] = '"../../../../victim.txt"'
    result = run("pull", REPO, "-o", str(tmp_path / "out"), code=EXIT_HUB)
    assert result.stderr.count("\n") == 1 and "malformed ETag" in result.stderr
    assert victim.read_bytes() == b"precious" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("reason", ["Bad\tGateway", "Bad\x1b[2J\x1b]0;pwned\x07Gateway", "Bad\x9b31mGateway"])
def test_hostile_reason_phrase_never_reaches_the_terminal_raw(run, hub, tmp_path, reason):
    hub.state.fail = (502, reason)
    result = run("pull", REPO, "-o", str(tmp_path / "out"), code=EXIT_HUB)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not any(c in result.stderr[:-1] for c in "\t\x1b\x07\x9b")
    shown = {"Bad\tGateway": "Bad\\tGateway", "Bad\x1b[2J\x1b]0;pwned\x07Gateway": "Bad\\x1b[2J\\x1b]0;pwned\\x07Gateway"}
    assert f"HTTP 502 {shown.get(reason, 'Bad31mGateway')}; try again later" in result.stderr  # escaped (C1 bytes dropped by the client)


def test_slow_hub_is_one_line(run, hub, adapter_dir, tmp_path, monkeypatch, caplog):
    run("push", str(adapter_dir), REPO)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.2)
    hub.state.stall.add(spec.WEIGHTS_NAME)
    caplog.clear()
    result = run("pull", REPO, "-o", str(tmp_path / "out"), code=EXIT_HUB)
    assert result.stderr.count("\n") == 1 and "no data for 0.2 s, 3 attempts" in result.stderr
    assert result.stdout == "" and not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------- issue 17: single-file LoRA repos

LORAS = "me/sd-loras"


@pytest.fixture
def kohya(tmp_path) -> Path:
    return kohya_file(tmp_path / "pixel.safetensors")


def test_push_of_a_kohya_file_then_pull_file_round_trips_bytes(run, hub, kohya, tmp_path):
    pushed = json.loads(run("push", str(kohya), LORAS, "--json").stdout)
    assert pushed["files"] == ["pixel.safetensors", spec.CARD_NAME]
    result = run("pull", LORAS, "--file", "pixel.safetensors", "-o", str(tmp_path / "loras"))
    assert f"pulled {LORAS}@main:pixel.safetensors into {tmp_path / 'loras' / 'pixel.safetensors'}" in result.stdout
    assert (tmp_path / "loras" / "pixel.safetensors").read_bytes() == kohya.read_bytes()
    sha = pushed["commit_sha"]
    pinned = json.loads(run("pull", LORAS, "--file", "pixel.safetensors", "--revision", sha, "-o", str(tmp_path / "p"), "--json").stdout)
    assert pinned["commit_sha"] == sha and pinned["path"] == str(tmp_path / "p" / "pixel.safetensors")


def test_hf_file_reference_in_validate_inspect_and_merge(run, hub, kohya, tmp_path):
    host(hub, LORAS, {"v1/pixel.safetensors": kohya.read_bytes()})
    ref = f"hf://{LORAS}/v1/pixel.safetensors"
    assert "valid" in run("validate", ref).stdout
    summary = json.loads(run("inspect", ref, "--json").stdout)
    assert summary["num_params"] == 120 and len(summary["modules"]) == 2
    base = sd_base(tmp_path / "base.safetensors")
    run("merge", str(base), ref, "-o", str(tmp_path / "hub.safetensors"))
    run("merge", str(base), str(kohya), "-o", str(tmp_path / "local.safetensors"))
    assert (tmp_path / "hub.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()


def test_pull_file_tampered_exits_4_with_one_line(run, hub, kohya, tmp_path):
    host(hub, LORAS, {"pixel.safetensors": kohya.read_bytes()})
    bad = bytearray(kohya.read_bytes())
    bad[-1] ^= 0x01
    hub.state.served[(LORAS, "pixel.safetensors")] = bytes(bad)
    result = run("pull", LORAS, "--file", "pixel.safetensors", "-o", str(tmp_path / "out"), code=EXIT_HUB)
    assert result.stderr.count("\n") == 1 and "do not match the LFS sha256" in result.stderr
    assert not (tmp_path / "out").exists()


def test_pull_file_missing_exits_4_naming_what_the_repo_holds(run, hub, kohya, tmp_path):
    host(hub, LORAS, {"pixel.safetensors": kohya.read_bytes()})
    result = run("pull", LORAS, "--file", "pixle.safetensors", code=EXIT_HUB)
    assert result.stderr == f"error: {LORAS}@main has no file 'pixle.safetensors'; it holds 'pixel.safetensors'\n"


HOSTILE = ["../../victim.safetensors", "/etc/passwd.safetensors", "sub\\x.safetensors", "x\x1b]0;pwn\x07.safetensors"]


@pytest.mark.parametrize("name", HOSTILE)
def test_pull_file_hostile_names_exit_2_before_any_request(run, hub, name):
    result = run("pull", LORAS, "--file", name, code=EXIT_USAGE)
    assert result.stderr.count("\n") == 1 and "is refused" in result.stderr
    assert not any(c in result.stderr[:-1] for c in "\x1b\x07")
    assert hub.state.requests == []


def test_hf_reference_to_a_folder_is_refused(run, hub):
    result = run("validate", f"hf://{LORAS}/styles", code=EXIT_HUB)
    assert "a path inside a repo must name a .safetensors file" in result.stderr and hub.state.requests == []


def test_push_format_peft_keeps_the_old_conversion(run, hub, make_adapter):
    single = make_adapter("single.safetensors")
    assert json.loads(run("push", str(single), REPO, "--json").stdout)["files"] == [spec.CONFIG_NAME, spec.WEIGHTS_NAME, spec.CARD_NAME]
    kept = json.loads(run("push", str(single), REPO, "--format", "original", "--json").stdout)
    assert kept["files"] == ["single.safetensors", spec.CARD_NAME]
    assert "--format [peft|original]" in run("push", "--help").stdout


def test_pull_revision_option_for_a_peft_repo(run, hub, adapter_dir, tmp_path):
    pushed = json.loads(run("push", str(adapter_dir), REPO, "--revision", "dev", "--json").stdout)
    pulled = json.loads(run("pull", REPO, "--revision", "dev", "-o", str(tmp_path / "dev"), "--json").stdout)
    assert pulled["commit_sha"] == pushed["commit_sha"] and pulled["revision"] == "dev"
    result = run("pull", f"{REPO}@main", "--revision", "dev", code=EXIT_USAGE)
    assert "names the revision 'main' but --revision says 'dev'; give one" in result.stderr


def test_hostile_name_in_an_hf_path_exits_2(run, hub):
    result = run("validate", f"hf://{LORAS}/sub/../../x.safetensors", code=EXIT_USAGE)
    assert "is refused" in result.stderr and hub.state.requests == []
