import subprocess
import sys

import pytest
from click.testing import CliRunner

import loratools
from loratools.cli import main
from loratools.cli.app import COMMANDS

from ..test_validation import write


@pytest.fixture()
def runner():
    return CliRunner()


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and loratools.__version__ in result.output


def test_errors_are_one_line_without_traceback(runner, tmp_path):
    result = runner.invoke(main, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "no such file" in lines[0]
    assert "Traceback" not in result.output + result.stderr


def test_debug_shows_traceback(runner, tmp_path):
    result = runner.invoke(main, ["--debug", "inspect", str(tmp_path / "missing")])
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_help_has_examples(runner):
    for command in ("validate", "inspect"):
        result = runner.invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "loratools " + command in result.output


def _bad_inputs(tmp_path):
    """One broken adapter per kind of bad input, each with the text its error line must carry."""
    import torch
    from safetensors.torch import save_file

    from loratools import save

    from ..factories import random_adapter

    cases = {}
    pickled = write(tmp_path / "pickle")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    cases["pickle"] = (pickled, "pickle")
    truncated = write(tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    cases["truncated"] = (truncated, "truncated")
    cases["bad-json"] = (write(tmp_path / "json", config="{"), "adapter_config.json")
    cases["future"] = (write(tmp_path / "future", metadata={"format": "pt", "loratools.spec_version": "9.0"}), "9.0")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, loha)
    cases["loha"] = (loha, "LoHa")
    save(random_adapter(1), tmp_path / "sum")
    data = bytearray((tmp_path / "sum" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "sum" / "adapter_model.safetensors").write_bytes(bytes(data))
    cases["checksum"] = (tmp_path / "sum", "sha256")
    return cases


@pytest.mark.parametrize("case", ["pickle", "truncated", "bad-json", "future", "loha", "checksum"])
def test_every_bad_input_is_one_line_naming_the_file(runner, tmp_path, case):
    path, needle = _bad_inputs(tmp_path)[case]
    for command in ("inspect", "resize"):
        args = [command, str(path)] + (["--rank", "1", "-o", str(tmp_path / "out")] if command == "resize" else [])
        result = runner.invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 3, (command, result.stderr)
        assert len(lines) == 1 and needle in lines[0] and str(tmp_path) in lines[0], lines
        assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert runner.invoke(main, ["validate", str(path)]).exit_code == 1


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, reporting which heavy modules it loaded (on stderr's last line)."""
    script = (
        "import sys, atexit\n"
        "atexit.register(lambda: sys.stderr.write('\\nLOADED ' + ' '.join(m for m in ('torch', 'huggingface_hub', 'safetensors') "
        "if m in sys.modules) + '\\n'))\n"
        "from loratools.cli import main\n"
        "sys.argv[0] = 'loratools'\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([name, "--help"] for name in sorted(COMMANDS))])
def test_help_and_version_never_import_torch(args):
    done = _run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "LOADED", done.stderr
    assert "Usage:" in done.stdout or "version" in done.stdout


def test_command_table_names_every_command_and_each_resolves(runner):
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name, (module, attribute) in COMMANDS.items():
        command = main.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None and command.name == name, (name, module, attribute)
    assert main.get_command(None, "nope") is None  # type: ignore[arg-type]
    unknown = runner.invoke(main, ["nope"])
    assert unknown.exit_code == 2 and "No such command" in unknown.output


def test_interrupt_while_starting_is_one_line_and_exit_130():
    # SIGINT arrives while the CLI is still importing: the handler installed first answers it.
    script = "import os, signal\nimport loratools.cli\nos.kill(os.getpid(), signal.SIGINT)\nimport time; time.sleep(5)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == ["error: interrupted; no output was written"]


def test_sigterm_during_a_command_exits_130_with_one_line():
    script = (  # a command whose library call blocks until the signal comes
        "import os, signal, sys, threading, time\n"
        "import loratools\n"
        "from loratools.cli import main\n"
        "loratools.validate = lambda *args, **kwargs: time.sleep(30)\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()\n"
        "sys.argv = ['loratools', 'validate', 'anything']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert "Traceback" not in done.stderr


def test_control_characters_from_files_reach_the_terminal_escaped(runner, tmp_path):
    evil = tmp_path / "evil\x1b[31m\n[bold]x"
    result = runner.invoke(main, ["inspect", str(evil)])
    assert result.exit_code == 3
    line = result.stderr.strip()
    assert "\x1b" not in line and "\n" not in line and "\\x1b[31m\\n[bold]x" in line
