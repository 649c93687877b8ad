"""A tensor index over a checkpoint's safetensors files, single or sharded, with lazy reads.

Headers are parsed here (8-byte little-endian length, JSON header, then data) so that a truncated
or inconsistent file is caught when the index is opened, with a message naming the file and the
byte counts, instead of failing mid-generation. Tensor bytes are read on demand through the
safetensors package.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeinf.errors import CheckpointError, MissingShardError, MissingTensorError, TruncatedShardError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses one safetensors file's header and checks that the file holds every byte it promises."""
    if not path.is_file():
        found = "a folder" if path.exists() else "nothing"
        raise MissingShardError(f"expected a safetensors file at {path}, found {found}")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedShardError(f"{path}: expected an 8-byte header length, found a {size}-byte file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise TruncatedShardError(
                f"{path}: header says {header_len} header bytes, but the file has only {size - 8} after the length"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: expected the safetensors header to be a JSON object, found {header!r:.80}")
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: header entry {name!r} should hold dtype, shape and data_offsets [begin, end], "
                f"found {entry!r:.120}"
            ) from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPES)}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} and dtype {dtype} needs {expected} bytes, "
                f"the header gives it {end - begin}"
            )
        if data_start + end > size:
            raise TruncatedShardError(
                f"{path}: tensor {name!r} ends at byte {data_start + end}, but the file has {size} bytes "
                "(truncated download or copy?)"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, end - begin)
    return infos


class TensorIndex:
    """Name -> TensorInfo over every safetensors file of a checkpoint folder."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()  # I/O workers re-read experts from the checkpoint concurrently

    @classmethod
    def open(cls, model_dir: str | Path) -> TensorIndex:
        model_dir = Path(model_dir)
        index_path = model_dir / SHARD_INDEX
        if index_path.exists():
            return cls._open_sharded(index_path)
        single = model_dir / SINGLE_FILE
        if not single.exists():
            raise MissingShardError(f"{model_dir}: expected {SINGLE_FILE} or {SHARD_INDEX}, found neither")
        return cls(read_header(single))

    @classmethod
    def _open_sharded(cls, index_path: Path) -> TensorIndex:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: expected 'weight_map' to be an object, found {weight_map!r:.80}")
        infos: dict[str, TensorInfo] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name, shard in weight_map.items():
            if shard not in headers:
                shard_path = index_path.parent / shard
                if not shard_path.is_file():
                    raise MissingShardError(f"{index_path} maps {name!r} to {shard}, which is not a file there")
                headers[shard] = read_header(shard_path)
            if name not in headers[shard]:
                raise MissingTensorError(f"{index_path} maps {name!r} to {shard}, but that file does not hold it")
            infos[name] = headers[shard][name]
        return cls(infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def files(self) -> list[Path]:
        return sorted({info.file for info in self.infos.values()})

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            files = ", ".join(p.name for p in self.files())
            raise MissingTensorError(f"tensor {name!r} is in none of the checkpoint's files ({files})") from None

    def _handle(self, name: str) -> object:
        info = self.info(name)
        with self._lock:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, on the CPU."""
        return self._handle(name).get_tensor(name)

    def read_row(self, name: str, row: int) -> torch.Tensor:
        """tensor[row] (one slice along dim 0, e.g. one expert of a fused expert tensor), reading
        only that slice's bytes from disk."""
        shape = self.info(name).shape
        if not shape or not 0 <= row < shape[0]:
            raise MissingTensorError(f"tensor {name!r} of shape {list(shape)} has no row {row}")
        return self._handle(name).get_slice(name)[row : row + 1][0]
