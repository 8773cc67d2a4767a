"""The lazy package facade: ``import loratools`` is cheap, and every public name resolves."""

from __future__ import annotations

import json
import subprocess
import sys

import loratools


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_loads_neither_torch_nor_the_hub_client_nor_matplotlib():
    loaded = _modules_after("import loratools")
    assert not {"torch", "huggingface_hub", "matplotlib", "safetensors"} & loaded


def test_loading_adapters_does_not_load_the_hub_client():
    loaded = _modules_after("import loratools; loratools.load; loratools.merge; loratools.resize; loratools.validate")
    assert "torch" in loaded and "huggingface_hub" not in loaded and "matplotlib" not in loaded


def test_every_public_name_resolves_and_all_lists_exactly_the_exports():
    assert set(loratools.__all__) == set(loratools._EXPORTS) | {"__version__"}
    for name in loratools.__all__:
        assert getattr(loratools, name) is not None, name
    assert callable(loratools.merge) and callable(loratools.validate)  # the functions, not their modules


def test_public_functions_stay_functions_after_their_modules_are_imported():
    loaded = subprocess.run(
        [sys.executable, "-c", "import loratools.merging, loratools.validation, loratools; print(loratools.merge, loratools.validate)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "<function merge" in loaded and "<function validate" in loaded


def test_unknown_name_is_an_attribute_error():
    try:
        loratools.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
