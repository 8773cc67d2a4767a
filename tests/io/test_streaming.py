"""Streaming a checkpoint through per-tensor transforms: bytes, headers, index and side files."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratools.errors import DiskSpaceError
from loratools.io.checkpoint import open_checkpoint
from loratools.io.mirror import check_free_space, side_files, update_config, write_index
from loratools.io.streaming import FilePlan, WriteOptions, stream_files, write_checkpoint


def _negate(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(-src.float())


@pytest.mark.parametrize("direct", [True, False])
def test_transformed_and_untouched_tensors(tmp_path, direct):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(4, dtype=torch.bfloat16), "c": torch.ones(3, 1)}
    save_file(tensors, tmp_path / "in.safetensors", metadata={"k": "v"})
    header = open_checkpoint(tmp_path / "in.safetensors").headers["in.safetensors"]
    plan = FilePlan(header, {n: i.dtype for n, i in header.tensors.items()}, {"a": _negate})
    done: list[int] = []
    stream_files([(plan, tmp_path / "out.safetensors")], direct=direct, progress=done.append)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert torch.equal(fh.get_tensor("a"), -tensors["a"]) and fh.metadata() == {"k": "v"}
        assert torch.equal(fh.get_tensor("b"), tensors["b"]) and torch.equal(fh.get_tensor("c"), tensors["c"])
    assert sum(done) == (tmp_path / "out.safetensors").stat().st_size == plan.size
    assert (tmp_path / "out.safetensors").read_bytes()[: header.data_start] == (tmp_path / "in.safetensors").read_bytes()[
        : header.data_start
    ]


def test_cast_rewrites_the_header_and_data_size(tmp_path):
    save_file({"w": torch.full((4, 4), 1.5)}, tmp_path / "in.safetensors")
    header = open_checkpoint(tmp_path / "in.safetensors").headers["in.safetensors"]
    plan = FilePlan(header, {"w": "BF16"}, {})
    assert plan.data_bytes == 32 and plan.computed("w", header.tensors["w"])
    stream_files([(plan, tmp_path / "out.safetensors")])
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert fh.get_tensor("w").dtype == torch.bfloat16 and torch.equal(fh.get_tensor("w").float(), torch.full((4, 4), 1.5))


def test_side_files_leave_out_weights_everywhere(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / ".loratools-tmp-x").mkdir()
    (tmp_path / ".git").mkdir()
    assert [p.name for p in side_files(tmp_path, {"model.safetensors"})] == ["config.json", "tokenizer.json"]


def test_index_keeps_its_map_and_gets_the_new_total(tmp_path):
    write_index({"metadata": {"total_size": 1, "format": "pt"}, "weight_map": {"w": "a.safetensors"}}, 96, tmp_path / "i.json")
    assert json.loads((tmp_path / "i.json").read_text()) == {
        "metadata": {"format": "pt", "total_size": 96},
        "weight_map": {"w": "a.safetensors"},
    }


def test_free_space_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(DiskSpaceError, match="free some space"):
        check_free_space(tmp_path / "not" / "yet", 2**62)


def test_write_checkpoint_mirrors_a_directory(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.ones(2, 2)}, base / "model.safetensors")
    (base / "config.json").write_text('{"a": 1}')
    checkpoint = open_checkpoint(base)
    plans = [FilePlan(checkpoint.headers["model.safetensors"], {"w": "F32"}, {"w": _negate})]
    total = write_checkpoint(checkpoint, plans, tmp_path / "out", WriteOptions())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert total == (tmp_path / "out" / "model.safetensors").stat().st_size


def test_dropped_renamed_and_reordered_tensors(tmp_path):
    """A scale written behind its weight, another tensor renamed, one dropped: order, names and data follow."""
    tensors = {"w_scale": torch.full((1,), 2.0), "w": torch.arange(4.0).reshape(2, 2), "old": torch.ones(3), "gone": torch.zeros(2)}
    save_file(tensors, tmp_path / "in.safetensors")
    header = open_checkpoint(tmp_path / "in.safetensors").headers["in.safetensors"]
    dtypes = {"w_scale": "F32", "w": "F32", "new": "F32"}
    plan = FilePlan(header, dtypes, {"w": _negate}, dropped=frozenset({"gone"}), renamed={"old": "new"}, after={"w_scale": "w"})
    names = [name for name, _ in plan.outputs]
    assert names.index("w_scale") == names.index("w") + 1 and "gone" not in names and "new" in names and "old" not in names
    stream_files([(plan, tmp_path / "out.safetensors")])
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert sorted(fh.keys()) == ["new", "w", "w_scale"]
        assert torch.equal(fh.get_tensor("w"), -tensors["w"]) and torch.equal(fh.get_tensor("new"), tensors["old"])
        assert torch.equal(fh.get_tensor("w_scale"), tensors["w_scale"])
    assert (tmp_path / "out.safetensors").stat().st_size == plan.size


def test_index_drops_removed_tensors_and_config_loses_fields(tmp_path):
    index = {"metadata": {"total_size": 1}, "weight_map": {"w": "a.safetensors", "w_scale": "a.safetensors", "old": "a.safetensors"}}
    write_index(index, 8, tmp_path / "i.json", {"new": "a.safetensors"}, removed=["w_scale", "old"])
    assert json.loads((tmp_path / "i.json").read_text())["weight_map"] == {"new": "a.safetensors", "w": "a.safetensors"}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}, "text_config": {"quantization_config": {}}, "a": 1}))
    update_config(config, {}, removed=["quantization_config"])
    assert json.loads(config.read_text()) == {"a": 1, "text_config": {}}


def test_a_transform_may_finish_after_it_returns(tmp_path):
    """A transform that returns a Pending fills dst on another thread; the writer waits for it, the next tensors are
    handed out meanwhile, and a failure it raises stops the stream with that error."""
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(8.0).reshape(4, 2), "c": torch.ones(3, 1)}
    save_file(tensors, tmp_path / "in.safetensors")
    header = open_checkpoint(tmp_path / "in.safetensors").headers["in.safetensors"]
    order: list[str] = []
    handed = {name: threading.Event() for name in tensors}

    def later(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
        def transform(src: torch.Tensor, dst: torch.Tensor):  # type: ignore[no-untyped-def]
            order.append(f"handed {name}")
            handed[name].set()
            start = threading.Event()
            worker = threading.Thread(target=lambda: (start.wait(), dst.copy_(-src.float())))
            worker.start()

            def pending() -> None:
                if name == "a":
                    handed["b"].wait(timeout=30)  # never set if the stream waited for a before handing out b
                order.append(f"wait {name}")
                start.set()
                worker.join()
                if fail:
                    raise DiskSpaceError("the pending transform failed", path=tmp_path)

            return pending

        return transform

    plan = FilePlan(header, {n: i.dtype for n, i in header.tensors.items()}, {"a": later("a"), "b": later("b"), "c": _negate})
    stream_files([(plan, tmp_path / "out.safetensors")])
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        assert all(torch.equal(fh.get_tensor(n), -t) for n, t in tensors.items())
    assert order.index("handed b") < order.index("wait a")  # b was handed out before a was written
    failing = FilePlan(header, {n: i.dtype for n, i in header.tensors.items()}, {"a": later("a", fail=True)})
    with pytest.raises(DiskSpaceError, match="pending transform failed"):
        stream_files([(failing, tmp_path / "bad.safetensors")])
