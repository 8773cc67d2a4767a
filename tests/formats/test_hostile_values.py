"""kohya and diffusers files with values no LoRA has: one FormatError naming the tensor, never a crash.

Also the size guard of loratools.io.tensorfile.load_tensors: a sparse file claiming terabytes is
refused before anything is allocated.
"""

import math
import struct

import pytest
import torch
from safetensors.torch import save_file

import loratools
from loratools.errors import FormatError
from loratools.formats.registry import read_raw

K = "lora_unet_blocks_0_to_q"
D = "unet.blocks.0.to_q"


@pytest.mark.parametrize(
    "alpha,needle",
    [
        (torch.tensor([1.0, 2.0]), "alpha must be one number, but the tensor has shape [2]"),
        (torch.zeros(0), "alpha must be one number, but the tensor has shape [0]"),
        (torch.tensor(math.inf), "alpha is inf; a non-finite alpha"),
        (torch.tensor(-math.inf), "alpha is -inf"),
        (torch.tensor([math.nan]), "alpha is nan"),
    ],
)
def test_kohya_alpha_must_be_one_finite_number(tmp_path, alpha, needle):
    path = tmp_path / "k.safetensors"
    save_file({f"{K}.lora_down.weight": torch.ones(2, 4), f"{K}.lora_up.weight": torch.ones(4, 2), f"{K}.alpha": alpha}, path)
    with pytest.raises(FormatError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
        read_raw(path)
    assert f"{K}.alpha" in str(info.value) and info.value.code == "bad-alpha"
    report = loratools.validate(path)
    assert not report.ok and report.problems[0].code == "bad-alpha"


def test_kohya_alpha_of_shape_1_is_a_number(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file({f"{K}.lora_down.weight": torch.ones(2, 4), f"{K}.lora_up.weight": torch.ones(4, 2), f"{K}.alpha": torch.tensor([1.0])}, path)
    assert loratools.load(path).modules[K].scale == 0.5


FLAT = [(torch.tensor(1.0), torch.ones(4, 2)), (torch.ones(2, 4), torch.ones(4)), (torch.ones(2), torch.ones(4, 2))]


@pytest.mark.parametrize("down,up", FLAT)
def test_kohya_factors_of_fewer_than_two_dims(tmp_path, down, up):
    path = tmp_path / "k.safetensors"
    save_file({f"{K}.lora_down.weight": down, f"{K}.lora_up.weight": up}, path)
    with pytest.raises(FormatError, match="at least 2 dimensions") as info:
        read_raw(path)
    assert info.value.code == "bad-shape" and K in str(info.value)


def test_diffusers_alpha_and_factor_checks(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({f"{D}.lora.down.weight": torch.ones(2, 4), f"{D}.lora.up.weight": torch.ones(4, 2), f"{D}.alpha": torch.ones(3)}, path)
    with pytest.raises(FormatError, match="alpha must be one number"):
        read_raw(path)
    save_file({f"{D}.lora.down.weight": torch.tensor(2.0), f"{D}.lora.up.weight": torch.ones(4, 2)}, path)
    with pytest.raises(FormatError, match="at least 2 dimensions"):
        read_raw(path)


@pytest.mark.parametrize(
    "meta,needle",
    [
        ('{"unet.lora_alpha": "8"}', "lora_adapter_metadata unet.lora_alpha must be a finite number > 0"),
        ('{"unet.lora_alpha": Infinity}', "lora_adapter_metadata unet.lora_alpha must be a finite number > 0, got inf"),
        ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"(?i)x": 2}}', "as PEFT embeds it"),
        ('{"unet.lora_alpha": 8, "unet.use_rslora": "yes"}', "use_rslora must be true or false"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_diffusers_adapter_metadata_values_are_checked(tmp_path, meta, needle):
    path = tmp_path / "d.safetensors"
    tensors = {f"{D}.lora_A.weight": torch.ones(2, 4), f"{D}.lora_B.weight": torch.ones(4, 2)}
    save_file(tensors, path, metadata={"lora_adapter_metadata": meta})
    with pytest.raises(FormatError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        read_raw(path)


def test_diffusers_key_ending_in_newline_is_not_a_factor(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({f"{D}.lora_A.weight\n": torch.ones(2, 4), f"{D}.lora_B.weight": torch.ones(4, 2)}, path)
    with pytest.raises(FormatError, match="not LoRA factors"):
        read_raw(path)


def test_sparse_file_claiming_terabytes_is_refused_before_allocation(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    n = 2**20  # two 2**20 x 2**20 F32 factors: 8 TiB of claimed data in a sparse file
    header = (
        f'{{"base_model.model.q.lora_A.weight":{{"dtype":"F32","shape":[{n},{n}],"data_offsets":[0,{4 * n * n}]}},'
        f'"base_model.model.q.lora_B.weight":{{"dtype":"F32","shape":[{n},{n}],"data_offsets":[{4 * n * n},{8 * n * n}]}}}}'
    ).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        try:
            fh.truncate(8 + len(header) + 8 * n * n)
        except OSError:
            pytest.skip("this file system holds no 8 TiB sparse file")
    (tmp_path / "adapter_config.json").write_text('{"peft_type":"LORA","r":1048576,"lora_alpha":1,"target_modules":["q"]}')
    with pytest.raises(FormatError, match="its tensors claim 8192.0 GiB, more than this machine's"):
        read_raw(tmp_path)
    assert loratools.validate(tmp_path).problems[0].code == "corrupt-file"
