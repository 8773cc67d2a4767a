"""Malformed model.safetensors.index.json files: one FormatError naming the index, never a crash."""

import pytest
import torch
from safetensors.torch import save_file

from loratools.errors import FormatError
from loratools.io.checkpoint import INDEX_NAME, open_checkpoint


@pytest.mark.parametrize(
    "text,needle",
    [
        (b"[]", "needs an object with a weight_map object"),
        (b'{"weight_map": null}', "weight_map None"),
        (b'{"weight_map": []}', "weight_map []"),
        (b'{"metadata": {}}', "weight_map None"),
        (b'{"weight_map": {"a.weight": 5}}', "must be strings, got 5"),
        (b'{"weight_map": {"a.weight": null}}', "must be strings, got None"),
        (b'{"weight_map": {"a.weight": ".."}}', "outside"),
        (b'{"weight_map": {"a.weight": ""}}', "outside"),
        (b'{"weight_map": {"a.weight": "a\\u0000.safetensors"}}', "outside"),
        (b'{"weight_map": {"a.weight": "sub\\\\x.safetensors"}}', "outside"),
        (b'{"weight_map": {"a.weight": "/etc/passwd"}}', "outside"),
        (b'\xff\xfe{"weight_map": {}}', "not UTF-8"),
        (b'{"weight_map": {"a": "\xe9.safetensors"}}', "not UTF-8"),
        (b"[" * 100_000, "not UTF-8 JSON"),
        (b'{"weight_map": {"a": "x"}, "n": ' + b"1" * 5000 + b"}", "not UTF-8 JSON"),
    ],
)
def test_malformed_index_is_refused_by_name(tmp_path, text, needle):
    save_file({"a.weight": torch.zeros(1)}, tmp_path / "x.safetensors")
    (tmp_path / INDEX_NAME).write_bytes(text)
    with pytest.raises(FormatError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert needle in message and str(tmp_path / INDEX_NAME) in message
    assert "\n" not in message and len(message) < 300 + len(str(tmp_path))
