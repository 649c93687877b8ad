"""Broken checkpoints fail at open time with a named moeinf exception whose message says what was
expected and what was found. Each test breaks its own copy of a tiny Mixtral saved by transformers."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeinf import LLM
from moeinf.errors import (
    CheckpointError,
    ConfigError,
    MissingShardError,
    MissingTensorError,
    MoeinfError,
    TensorDtypeError,
    TensorShapeError,
    TruncatedShardError,
    UnsupportedArchitectureError,
)
from moeinf.loaders.checkpoint import Checkpoint
from tests.checkpoints import save_tiny_mixtral

EXPERT_TENSOR = "model.layers.1.block_sparse_moe.experts.2.w3.weight"  # [intermediate, hidden] = [96, 64]
ROUTER_TENSOR = "model.layers.0.block_sparse_moe.gate.weight"  # [experts, hidden] = [4, 64]


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_mixtral_sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mixtral-sharded")
    save_tiny_mixtral(folder, max_shard_size="50KB")
    return folder


@pytest.fixture
def ckpt(tiny_mixtral, tmp_path) -> Path:
    """A private, writable copy of the single-file tiny Mixtral."""
    folder, _ = tiny_mixtral
    return Path(shutil.copytree(folder, tmp_path / "ckpt"))


@pytest.fixture
def sharded(tiny_mixtral_sharded, tmp_path) -> Path:
    """A private, writable copy of the sharded tiny Mixtral."""
    return Path(shutil.copytree(tiny_mixtral_sharded, tmp_path / "ckpt-sharded"))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)
    assert path.stat().st_size == size


def tensor_ends(path: Path) -> dict[str, int]:
    """Absolute end byte of every tensor in a safetensors file, parsed independently of moeinf."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return {k: 8 + header_len + v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"}


def rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def shard_of(folder: Path, tensor: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


# ------------------------------------------------------------------------------------------- baseline


def test_intact_copies_open(ckpt, sharded):
    """The copies the other tests break are themselves valid, so every failure below is the break's."""
    for folder in (ckpt, sharded):
        checkpoint = Checkpoint.open(folder)
        assert checkpoint.spec.num_experts == 4
        assert checkpoint.read("expert_up", 1, 2).shape == (96, 64)


def test_every_named_error_is_a_moeinf_error():
    for cls in (
        ConfigError,
        UnsupportedArchitectureError,
        CheckpointError,
        MissingShardError,
        TruncatedShardError,
        MissingTensorError,
        TensorShapeError,
        TensorDtypeError,
    ):
        assert issubclass(cls, MoeinfError), cls
    assert issubclass(MissingShardError, FileNotFoundError)
    assert issubclass(MissingTensorError, KeyError)


# ------------------------------------------------------------------------------------- truncated files


def test_truncated_single_file(ckpt):
    path = ckpt / "model.safetensors"
    full = path.stat().st_size
    cut = int(full * 0.7)
    ends = tensor_ends(path)
    truncate(path, cut)
    pattern = rf"model\.safetensors: tensor '.+' ends at byte \d+, but the file has {cut} bytes"
    with pytest.raises(TruncatedShardError, match=pattern) as info:
        Checkpoint.open(ckpt)
    name, end = re.search(r"tensor '(.+)' ends at byte (\d+)", str(info.value)).groups()
    assert ends[name] == int(end) > cut  # names a tensor that really lies past the cut, and where it ends


def test_truncated_single_file_through_llm(ckpt):
    path = ckpt / "model.safetensors"
    cut = int(path.stat().st_size * 0.7)
    truncate(path, cut)
    with pytest.raises(TruncatedShardError, match=rf"model\.safetensors: .* but the file has {cut} bytes"):
        LLM(ckpt, progress=False)


def test_file_cut_inside_its_header(ckpt):
    path = ckpt / "model.safetensors"
    truncate(path, 20)
    pattern = r"model\.safetensors: header says \d+ header bytes, but the file has only 12 after the length"
    with pytest.raises(TruncatedShardError, match=pattern):
        Checkpoint.open(ckpt)


def test_file_cut_inside_its_length_prefix(ckpt):
    truncate(ckpt / "model.safetensors", 5)
    pattern = r"model\.safetensors: expected an 8-byte header length, found a 5-byte file"
    with pytest.raises(TruncatedShardError, match=pattern):
        Checkpoint.open(ckpt)


def test_empty_file(ckpt):
    truncate(ckpt / "model.safetensors", 0)
    with pytest.raises(TruncatedShardError, match=r"found a 0-byte file"):
        Checkpoint.open(ckpt)


def test_truncated_shard_in_sharded_checkpoint(sharded):
    shard = shard_of(sharded, EXPERT_TENSOR)
    path = sharded / shard
    cut = int(path.stat().st_size * 0.7)
    truncate(path, cut)
    pattern = rf"{re.escape(shard)}: tensor '.+' ends at byte \d+, but the file has {cut} bytes"
    with pytest.raises(TruncatedShardError, match=pattern):
        Checkpoint.open(sharded)


# ------------------------------------------------------------------------------------- missing files


def test_shard_listed_in_index_deleted(sharded):
    shard = shard_of(sharded, EXPERT_TENSOR)
    (sharded / shard).unlink()
    pattern = rf"model\.safetensors\.index\.json maps '.+' to {re.escape(shard)}, which is not a file there"
    with pytest.raises(MissingShardError, match=pattern):
        Checkpoint.open(sharded)


def test_no_weight_file_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    pattern = r"expected model\.safetensors or model\.safetensors\.index\.json, found neither"
    with pytest.raises(MissingShardError, match=pattern):
        Checkpoint.open(ckpt)


# ------------------------------------------------------------------------------------- bad tensors


def test_missing_expert_tensor(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop(EXPERT_TENSOR))
    pattern = rf"tensor '{re.escape(EXPERT_TENSOR)}' is in none of the checkpoint's files \(model\.safetensors\)"
    with pytest.raises(MissingTensorError, match=pattern):
        Checkpoint.open(ckpt)


def test_missing_expert_tensor_through_llm(ckpt):
    rewrite(ckpt / "model.safetensors", lambda t: t.pop(EXPERT_TENSOR))
    with pytest.raises(MissingTensorError, match=re.escape(EXPERT_TENSOR)):
        LLM(ckpt, progress=False)


def test_sharded_index_names_a_tensor_its_shard_lacks(sharded):
    shard = shard_of(sharded, EXPERT_TENSOR)
    rewrite(sharded / shard, lambda t: t.pop(EXPERT_TENSOR))
    pattern = rf"maps '{re.escape(EXPERT_TENSOR)}' to {re.escape(shard)}, but that file does not hold it"
    with pytest.raises(MissingTensorError, match=pattern):
        Checkpoint.open(sharded)


def test_sharded_index_lacks_a_tensor(sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"][EXPERT_TENSOR]
    index.write_text(json.dumps(data))
    pattern = rf"tensor '{re.escape(EXPERT_TENSOR)}' is in none of the checkpoint's files"
    with pytest.raises(MissingTensorError, match=pattern):
        Checkpoint.open(sharded)


def test_tensor_of_wrong_shape(ckpt):
    def transpose(tensors):
        tensors[EXPERT_TENSOR] = tensors[EXPERT_TENSOR].t().contiguous()  # [96, 64] -> [64, 96]

    rewrite(ckpt / "model.safetensors", transpose)
    pattern = (
        rf"model\.safetensors: tensor '{re.escape(EXPERT_TENSOR)}' "
        r"should have shape \[96, 64\] for this config, found \[64, 96\]"
    )
    with pytest.raises(TensorShapeError, match=pattern):
        Checkpoint.open(ckpt)


def test_tensor_of_wrong_dtype(ckpt):
    def to_int(tensors):
        tensors[ROUTER_TENSOR] = torch.zeros(tensors[ROUTER_TENSOR].shape, dtype=torch.int32)

    rewrite(ckpt / "model.safetensors", to_int)
    pattern = rf"tensor '{re.escape(ROUTER_TENSOR)}' should be one of F32, F16, BF16, found I32"
    with pytest.raises(TensorDtypeError, match=pattern):
        Checkpoint.open(ckpt)


# ------------------------------------------------------------------------------------- bad config


def test_unknown_architecture(ckpt):
    edit_config(ckpt, lambda c: c.update(architectures=["SwitchTransformersForConditionalGeneration"]))
    pattern = (
        r"SwitchTransformersForConditionalGeneration is not supported; "
        r"supported architectures: .*MixtralForCausalLM"
    )
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        Checkpoint.open(ckpt)


def test_config_json_missing(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"expected config\.json in .*, found no such file"):
        Checkpoint.open(ckpt)


def test_config_json_not_json(ckpt):
    (ckpt / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], "hidden_size": ')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        Checkpoint.open(ckpt)


def test_config_json_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object, found list"):
        Checkpoint.open(ckpt)


def test_required_key_missing(ckpt):
    edit_config(ckpt, lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError, match=r"missing required key 'hidden_size' \(a positive integer\)"):
        Checkpoint.open(ckpt)


def test_key_of_wrong_type(ckpt):
    edit_config(ckpt, lambda c: c.update(num_local_experts="eight"))
    with pytest.raises(ConfigError, match=r"expected 'num_local_experts' to be a positive integer, found 'eight'"):
        Checkpoint.open(ckpt)


def test_top_k_exceeds_experts(ckpt):
    edit_config(ckpt, lambda c: c.update(num_experts_per_tok=5))
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(5\) exceeds num_local_experts \(4\)"):
        Checkpoint.open(ckpt)


def test_config_error_through_llm(ckpt):
    edit_config(ckpt, lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError, match=r"'hidden_size'"):
        LLM(ckpt, progress=False)


def test_malformed_index_and_header_entries_are_named_errors(tiny_mixtral, tmp_path):
    """Structurally wrong JSON (valid JSON of the wrong shape) is a CheckpointError, not a crash."""
    from moeinf.errors import CheckpointError

    folder = tmp_path / "index-list"
    shutil.copytree(tiny_mixtral[0], folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(CheckpointError, match="expected 'weight_map' to be an object"):
        Checkpoint.open(folder)

    folder = tmp_path / "header-entry"
    shutil.copytree(tiny_mixtral[0], folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["shape"]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match="should hold dtype, shape and data_offsets"):
        Checkpoint.open(folder)
