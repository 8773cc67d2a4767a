"""read_header accepts exactly the headers the safetensors Rust reader accepts.

Every case is written to disk and opened with both ``read_header`` and ``safetensors.safe_open``
(the Rust reader PEFT loads through); the verdicts must agree.  The one deliberate difference:
sub-byte dtypes (F4, F6_*) are valid safetensors that loratools does not read.
"""

import json
import struct

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from safetensors import safe_open

from loratools.errors import FormatError
from loratools.io.tensorfile import read_header

T = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
W = '"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":'
D4 = b"\0" * 4


def verdicts(path, blob: bytes, data: bytes) -> tuple[bool, bool, str]:
    """(Rust accepts, we accept, our message) for a file of ``blob`` as header and ``data`` after it."""
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
        rust = True
    except Exception:  # noqa: BLE001 - any refusal by the reference reader
        rust = False
    try:
        read_header(path)
        return rust, True, ""
    except FormatError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return rust, False, str(err)


CASES = {
    "plain": ("{" + T + "}", D4),
    "duplicate tensor, last wins": ("{" + T + ',"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
    "duplicate tensor, first would fit": ("{" + T + ',"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D4),
    "duplicate __metadata__": ('{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"},' + T + "}", D4),
    "duplicate metadata key": ('{"__metadata__":{"a":"b","a":"c"},' + T + "}", D4),
    "duplicate dtype field": ('{"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "duplicate unknown field": ("{" + W + '1,"x":2}}', D4),
    "metadata null": ('{"__metadata__":null,' + T + "}", D4),
    "metadata list": ('{"__metadata__":[],' + T + "}", D4),
    "metadata string": ('{"__metadata__":"x",' + T + "}", D4),
    "metadata int value": ('{"__metadata__":{"a":1},' + T + "}", D4),
    "metadata null value": ('{"__metadata__":{"a":null},' + T + "}", D4),
    "BOM": ("\ufeff{" + T + "}", D4),
    "whitespace around": (" \n{" + T + "} \t\r\n", D4),
    "trailing NUL": ("{" + T + "}\0", D4),
    "unknown field": ("{" + W + "[1,2]}}", D4),
    "NaN": ("{" + W + "NaN}}", D4),
    "Infinity": ("{" + W + "-Infinity}}", D4),
    "1e400": ("{" + W + "1e400}}", D4),
    "1e-400": ("{" + W + "1e-400}}", D4),
    "integer beyond u64": ("{" + W + "123456789012345678901234567890}}", D4),
    "integer beyond double": ("{" + W + "1" * 400 + "}}", D4),
    "integer of 5000 digits": ("{" + W + "1" * 5000 + "}}", D4),
    "lone surrogate value": ("{" + W + '"\\ud800"}}', D4),
    "reversed surrogates": ("{" + W + '"\\ude00\\ud83d"}}', D4),
    "surrogate pair": ("{" + W + '"\\ud83d\\ude00"}}', D4),
    "lone surrogate key": ('{"\\udfff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "lone surrogate metadata": ('{"__metadata__":{"a":"\\udc00"},' + T + "}", D4),
    "empty": ("{}", b""),
    "empty name": ('{"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "top-level list": ("[]", b""),
    "top-level string": ('"x"', b""),
    "float offset": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', D4),
    "exponent offset": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4e0]}}', D4),
    "negative zero offset": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[-0,4]}}', D4),
    "bool dim": ('{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', D4),
    "float dim": ('{"w":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', D4),
    "dim 2**64": ('{"w":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', b""),
    "dim 2**64-1 then 0": ('{"w":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b""),
    "partial product overflows": ('{"w":{"dtype":"F32","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}}', b""),
    "bits overflow": ('{"w":{"dtype":"U8","shape":[2305843009213693952],"data_offsets":[0,0]}}', b""),
    "2**62 then 0": ('{"w":{"dtype":"F32","shape":[4611686018427387904,0],"data_offsets":[0,0]}}', b""),
    "three offsets": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4,5]}}', D4),
    "reversed offsets": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', D4),
    "empty tensor after a full one": (
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
        D4,
    ),
    "lowercase dtype": ('{"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', D4),
    "dtype list": ('{"w":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', D4),
    "dtype U16": ('{"w":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}', D4),
    "dtype C64": ('{"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', b"\0" * 8),
    "F4 misaligned": ('{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"\0" * 2),
    "missing shape": ('{"w":{"dtype":"F32","data_offsets":[0,4]}}', D4),
    "entry null": ('{"w":null}', b""),
    "nested 127": ("{" + W + "[" * 125 + "]" * 125 + "}}", D4),
    "nested 128": ("{" + W + "[" * 126 + "]" * 126 + "}}", D4),
    "nested 100000": ("{" + W + "[" * 100_000 + "]" * 100_000 + "}}", D4),
    "escaped newline in name": ('{"w\\n":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "raw control character": ('{"w\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "raw DEL": ('{"w\x7f":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
    "leading zero": ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[00,4]}}', D4),
    "tensor info as __metadata__": ('{"__metadata__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', D4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_verdict_matches_the_rust_reader(tmp_path, name):
    text, data = CASES[name]
    rust, ours, message = verdicts(tmp_path / "x.safetensors", text.encode("utf-8", "surrogatepass"), data)
    assert ours == rust, message


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"])
def test_only_plain_utf8_is_a_header(tmp_path, encoding):
    rust, ours, message = verdicts(tmp_path / "x.safetensors", ("{" + T + "}").encode(encoding), D4)
    assert not rust and not ours
    if encoding != "utf-16-le":  # ASCII in UTF-16-LE without a BOM is UTF-8 with NULs: bad JSON instead
        assert "not UTF-8" in message or "BOM" in message


def test_messages_name_the_field(tmp_path):
    _, _, message = verdicts(tmp_path / "x.safetensors", ('{"__metadata__":{"a":1},' + T + "}").encode(), D4)
    assert "__metadata__ must be an object of strings" in message
    _, _, message = verdicts(tmp_path / "x.safetensors", b'{"w":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', D4)
    assert "w: unknown safetensors dtype ['F32']" in message
    _, _, message = verdicts(tmp_path / "x.safetensors", ("{" + W + "[" * 100_000 + "]" * 100_000 + "}}").encode(), D4)
    assert "nested deeper than 127" in message


def test_sub_byte_dtypes_are_valid_but_not_read(tmp_path):
    rust, ours, message = verdicts(tmp_path / "x.safetensors", b'{"w":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"\0\0")
    assert rust and not ours and "sub-byte" in message


DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "U16", "F8_E4M3"] * 3 + ["f32", "Q4", "", "F4"]
NUMBERS = st.one_of(
    st.integers(-2, 12),
    st.sampled_from([2**64 - 1, 2**64, 2**63, 10**30, -(2**63) - 1]),
    st.sampled_from(["4.0", "-0", "1e400", "NaN", "1e2", "true", "null", '"4"']),
)


def _num(value) -> str:
    return value if isinstance(value, str) else str(value)


@st.composite
def headers(draw) -> tuple[bytes, bytes]:
    """A header close to valid: a few tensors laid out in order, then a handful of mutations."""
    entries: list[tuple[str, str]] = []
    offset = 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(NUMBERS if draw(st.integers(0, 9)) == 0 else st.integers(0, 3), max_size=3))
        size = 1
        for d in shape:
            size *= d if isinstance(d, int) and d >= 0 else 1
        size *= {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8, "U16": 2}.get(dtype, 1)
        begin, end = offset, offset + size
        if draw(st.integers(0, 7)) == 0:
            begin, end = draw(NUMBERS), draw(NUMBERS)
        offset = end if isinstance(end, int) and end >= 0 else offset
        extra = draw(st.sampled_from([""] * 12 + [',"x":[1]', ',"x":NaN', ',"x":"\\ud800"', ',"dtype":"F32"', ',"x":1e999']))
        name = draw(st.sampled_from([f"t{i}"] * 12 + ["__metadata__", "", "t0", "\\ud83d\\ude00", "a\\u0000"]))
        shape_text = "[" + ",".join(_num(d) for d in shape) + "]"
        entries.append((name, f'{{"dtype":"{dtype}","shape":{shape_text},"data_offsets":[{_num(begin)},{_num(end)}]{extra}}}'))
    meta = draw(st.sampled_from(["", '{"format":"pt"}'] * 4 + ["null", "[]", '{"a":1}', '{"a":"\\udc00"}', '{"a":"b","a":"c"}']))
    if meta:
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", meta))
    text = "{" + ",".join(f'"{k}":{v}' for k, v in entries) + "}"
    text = draw(st.sampled_from([""] * 6 + [" ", "\ufeff", "\n"])) + text + draw(st.sampled_from([""] * 6 + ["  ", "\0", "x", "}"]))
    encoding = draw(st.sampled_from(["utf-8"] * 16 + ["utf-16", "utf-32-le"]))
    data_size = (offset if offset < 4096 else 0) + draw(st.sampled_from([0] * 8 + [1, -1]))
    return text.encode(encoding), b"\1" * max(data_size, 0)


@seed(20261201)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=headers())
def test_fuzzed_headers_get_the_rust_readers_verdict(tmp_path, case):
    blob, data = case
    rust, ours, message = verdicts(tmp_path / "x.safetensors", blob, data)
    event("accepted" if rust else "refused")
    assert ours == rust, (blob[:300], message)


def test_writer_output_passes_both(tmp_path):
    blob = json.dumps({"__metadata__": {"k": "v"}, "w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    assert verdicts(tmp_path / "x.safetensors", blob, b"\0" * 8) == (True, True, "")
