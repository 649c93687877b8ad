"""The packed expert store: the disk tier, built once from a checkpoint.

Safetensors shards keep each expert as three tensors scattered across a file (or across files),
in the checkpoint's dtype, so loading one expert from them means three lookups, three reads and a
dtype conversion. The store instead holds every routed expert as one contiguous record, already in
its record format (the compute dtype, or int8 / int4: loaders/expert_record.py) and already in the
device slot layout, starting on an ALIGN boundary. Loading an
expert into a slot is then one large aligned read (O_DIRECT where the file system allows it, so the
page cache is not filled twice with bytes that go straight on to pinned or device memory) and two
plain byte copies.

File layout:
    [0, 24)                 magic b"MOEINFXS", u32 version, u32 reserved, u64 JSON length (little-endian)
    [24, 24 + JSON length)  UTF-8 JSON: fingerprint, num_layers, num_experts, format (the
                            ExpertFormat's fields), w13_shape, w2_shape, biases, record_nbytes,
                            data_offset, crc32 (one per record)
    [data_offset, ...)      records; record (l, e) is number l * E + e, record_nbytes each
    record                  its fields (expert_record.py: w13 [2F, D] gate rows then up rows, w2
                            [D, F], biases; or their quantized arrays), then zero padding

A store file is named by its format (experts-float32.moeinf, experts-int4-g32.moeinf), so stores of
one checkpoint in several formats sit side by side.

The fingerprint covers the checkpoint's config.json and the name, size and mtime of each weight
file, so a changed checkpoint makes the old store untrusted and it is rebuilt. A build writes to a
temporary file and renames it into place only once complete and synced, so an interrupted build
never leaves a file that a later open would trust. Every read checks the record's crc32, so a
corrupted record is caught (StoreChecksumError) and the caller can fall back to
`record_from_checkpoint`, then `repair_record` to write the rebuilt bytes back in place.

Builds in one folder take turns under an flock on the folder itself (build_lock), so a build that
was waiting finds the store its predecessor finished and reuses it, and the temporary files a
build finds there, holding the lock, are all of builds that are gone (killed: kill -9 runs no
cleanup) and are removed (remove_stale_temporaries).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from moeinf.atomic_write import atomic_write
from moeinf.errors import OffloadConfigError, StoreBufferError, StoreChecksumError, StoreError, StoreRecordError
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.expert_record import ALIGN, RecordLayout, pack_record, round_up

STORE_VERSION = 3  # 2: records may end with expert biases; 3: records may be quantized (header "format")
MAGIC = b"MOEINFXS"
PREFIX = struct.Struct("<8sIIQ")  # magic, version, reserved, JSON length
MAX_CRC = 0xFFFFFFFF
# the temporary file atomic_write gives a store file (".experts-float32.moeinf.k2j_x9ab.tmp":
# mkstemp's 8 random characters): the only names remove_stale_temporaries ever deletes
STALE_TEMPORARY = re.compile(r"\.experts-[a-z0-9_-]+\.moeinf\.[a-z0-9_]{8}\.tmp")


def checkpoint_fingerprint(checkpoint: Checkpoint, fmt: ExpertFormat) -> str:
    """sha256 hex over the store version, the record format, config.json's bytes, and the name, size and
    mtime of each safetensors file. Each field is length-prefixed so no two inputs collide."""
    digest = hashlib.sha256()

    def field(value: bytes | str | int) -> None:
        data = value if isinstance(value, bytes) else str(value).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    field(STORE_VERSION)
    field(fmt.name)
    field((Path(checkpoint.path) / "config.json").read_bytes())
    for file in checkpoint.index.files():
        stat = file.stat()
        field(file.name)
        field(stat.st_size)
        field(stat.st_mtime_ns)
    return digest.hexdigest()


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of `nbytes` whose first byte sits on an ALIGN boundary (O_DIRECT-ready)."""
    if nbytes < 0:
        raise StoreBufferError(f"expected a buffer size >= 0 bytes, found {nbytes}")
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    # an ndarray over `raw` rather than a slice: numpy gives an empty slice the base's address
    return np.ndarray((nbytes,), dtype=np.uint8, buffer=raw, offset=start)


def byte_view(out: Any, nbytes: int, what: str) -> np.ndarray:
    """`out` as a flat writable uint8 numpy array sharing its memory, checked to hold `nbytes`.

    Accepts anything with the buffer protocol (numpy arrays, bytearray, mmap) and CPU torch tensors."""
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or not out.is_contiguous():
            raise StoreBufferError(
                f"{what}: expected a contiguous CPU tensor, found one on {out.device} "
                f"(contiguous={out.is_contiguous()})"
            )
        out = out.reshape(-1).view(torch.uint8).numpy()
    try:
        view = memoryview(out)
    except TypeError:
        raise StoreBufferError(
            f"{what}: expected a writable buffer (numpy array, bytearray, CPU tensor) of at least {nbytes} bytes, "
            f"found {type(out).__name__}"
        ) from None
    if view.readonly:
        raise StoreBufferError(f"{what}: expected a writable buffer, found a read-only {type(out).__name__}")
    if not view.c_contiguous:
        raise StoreBufferError(f"{what}: expected a contiguous buffer, found a strided {type(out).__name__}")
    flat = np.frombuffer(view.cast("B"), dtype=np.uint8)
    if flat.nbytes < nbytes:
        raise StoreBufferError(f"{what}: expected a buffer of at least {nbytes} bytes, found {flat.nbytes}")
    return flat


def pread_full(fd: int, target: np.ndarray, offset: int) -> None:
    """Fills `target` from `fd` at `offset`; a read that ends early means the file shrank under us."""
    done = 0
    while done < target.nbytes:
        n = os.preadv(fd, [memoryview(target[done:])], offset + done)
        if n == 0:
            raise StoreError(
                f"expected {target.nbytes} bytes at offset {offset} of the expert store, "
                f"found end of file after {done} (was the store truncated while open?)"
            )
        done += n


def pwrite_full(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def encode_header(meta: dict[str, Any]) -> bytes:
    body = json.dumps(meta, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, STORE_VERSION, 0, len(body)) + body


def header_meta(fingerprint: str, num_layers: int, num_experts: int, layout: RecordLayout) -> dict[str, Any]:
    """The header fields that depend only on the checkpoint and format (no offsets, no checksums)."""
    return {
        "fingerprint": fingerprint,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "format": layout.format.header(),
        "w13_shape": list(layout.w13_shape),
        "w2_shape": list(layout.w2_shape),
        "biases": layout.biases,
        "record_nbytes": layout.record_nbytes,
    }


def data_offset_for(meta: dict[str, Any], num_records: int) -> int:
    """Where the records start: the header's size rounded up to ALIGN, sized with the widest
    possible checksums so that the real header (written after the records) always fits."""
    widest = {**meta, "crc32": [MAX_CRC] * num_records}
    offset = round_up(len(encode_header({**widest, "data_offset": 0})))
    while (needed := round_up(len(encode_header({**widest, "data_offset": offset})))) > offset:
        offset = needed
    return offset


def trusted_header(path: Path, expected: dict[str, Any], num_records: int) -> tuple[dict[str, Any] | None, str]:
    """(the header, "") if the file at `path` is a complete store for `expected`, else (None, why not)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(PREFIX.size)
            if len(prefix) < PREFIX.size:
                return None, f"expected a {PREFIX.size}-byte header prefix, found a {size}-byte file"
            magic, version, _, json_len = PREFIX.unpack(prefix)
            if magic != MAGIC:
                return None, f"expected magic {MAGIC!r}, found {magic!r}"
            if version != STORE_VERSION:
                return None, f"expected store version {STORE_VERSION}, found {version}"
            # the widest honest header: every key with a long value, 11 characters per checksum
            limit = 4096 + 11 * num_records
            if json_len > min(limit, size - PREFIX.size):
                return None, f"header claims {json_len} JSON bytes; at most {min(limit, size - PREFIX.size)} fit"
            meta = json.loads(f.read(json_len))
    except FileNotFoundError:
        return None, "no store file yet"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"header unreadable ({e})"
    if not isinstance(meta, dict):
        return None, f"expected the header JSON to be an object, found {type(meta).__name__}"
    for key, value in expected.items():
        if meta.get(key) != value:
            return None, f"header {key} is {meta.get(key)!r:.80}, the checkpoint needs {value!r:.80}"
    crcs = meta.get("crc32")
    if not (
        isinstance(crcs, list)
        and len(crcs) == num_records
        and all(type(c) is int and 0 <= c <= MAX_CRC for c in crcs)
    ):
        return None, f"expected {num_records} crc32 values in [0, 2**32), found {str(crcs):.80}"
    data_offset = meta.get("data_offset")
    if type(data_offset) is not int or data_offset % ALIGN or data_offset < PREFIX.size + json_len:
        return None, f"expected data_offset to be a multiple of {ALIGN} past the header, found {data_offset!r}"
    end = data_offset + num_records * expected["record_nbytes"]
    if size < end:
        return None, f"expected at least {end} bytes ({num_records} records), found a {size}-byte file (truncated)"
    return meta, ""


class ExpertStore:
    """One opened store file. `read_into` is thread-safe: it only issues positional reads."""

    def __init__(
        self,
        path: Path,
        checkpoint: Checkpoint,
        layout: RecordLayout,
        meta: dict[str, Any],
        built: bool,
        rebuild_reason: str | None,
        direct: bool,
    ):
        self.path = path
        self.checkpoint = checkpoint
        self.layout = layout
        self.num_layers: int = meta["num_layers"]
        self.num_experts: int = meta["num_experts"]
        self.data_offset: int = meta["data_offset"]
        self.crc32: tuple[int, ...] = tuple(meta["crc32"])  # [L * E], index layer * E + expert
        self.built = built
        self.rebuild_reason = rebuild_reason  # why the file was (re)built; None when it was reused
        self.direct = False
        self.direct_error: str | None = None  # why O_DIRECT is off, when it was asked for
        self._fd = os.open(path, os.O_RDONLY)
        self._direct_fd = -1
        self._write_fd = -1  # opened by the first repair_record
        self._repair_lock = threading.Lock()
        self.repair_error: str | None = None  # why the last repair_record could not repair, if it failed
        if direct:
            self._open_direct()

    @classmethod
    def open_or_build(
        cls,
        checkpoint: Checkpoint,
        directory: str | Path,
        fmt: ExpertFormat | torch.dtype,
        progress: bool = True,
        direct: bool = True,
    ) -> ExpertStore:
        """Opens `directory`/experts-<format name>.moeinf if it is a complete store of this checkpoint
        in `fmt` (a float dtype: float records of it); otherwise builds it first (built=True,
        rebuild_reason says why)."""
        spec = checkpoint.spec
        fmt = fmt if isinstance(fmt, ExpertFormat) else ExpertFormat.float(fmt)
        layout = RecordLayout.for_format(spec.hidden_size, spec.expert_ffn, fmt, biases=spec.expert_bias)
        directory = Path(directory).expanduser()
        path = directory / f"experts-{fmt.name}.moeinf"
        num_records = spec.num_moe_layers * spec.num_experts
        expected = header_meta(checkpoint_fingerprint(checkpoint, fmt), spec.num_moe_layers, spec.num_experts, layout)
        meta, reason = trusted_header(path, expected, num_records)
        if meta is not None:
            return cls(path, checkpoint, layout, meta, False, None, direct)
        make_store_folder(directory)
        with build_lock(directory, progress) as locked:
            # a build we waited for may have just finished the store
            meta, _ = trusted_header(path, expected, num_records)
            if meta is not None:
                return cls(path, checkpoint, layout, meta, False, None, direct)
            if locked:
                remove_stale_temporaries(directory)
            meta = build(checkpoint, path, layout, expected, progress)
        return cls(path, checkpoint, layout, meta, True, reason, direct)

    def _open_direct(self) -> None:
        """Opens the O_DIRECT fd and proves it with one aligned read; any refusal leaves direct off."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            self.direct_error = "this platform has no O_DIRECT"
            return
        try:
            self._direct_fd = os.open(self.path, os.O_RDONLY | flag)
            pread_full(self._direct_fd, aligned_buffer(ALIGN), 0)
        except (OSError, StoreError) as e:
            self.direct_error = f"O_DIRECT refused for {self.path}: {e}"
            if self._direct_fd >= 0:
                os.close(self._direct_fd)
                self._direct_fd = -1
            return
        self.direct = True

    def _record_index(self, layer: int, expert: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise StoreRecordError(
                f"expected layer in [0, {self.num_layers}) and expert in [0, {self.num_experts}), "
                f"found layer {layer}, expert {expert}"
            )
        return layer * self.num_experts + expert

    def read_into(self, layer: int, expert: int, out: Any) -> None:
        """Reads record (layer, expert) into `out` (>= record_nbytes bytes) and checks its crc32.

        out[:w13_nbytes] is w13 [2F, D], then w2 [D, F] (and the biases, see RecordLayout), in
        layout.dtype; the bytes from payload_nbytes up to record_nbytes are padding. Uses O_DIRECT
        when `out` starts on an ALIGN boundary."""
        if self._fd < 0:
            raise StoreError(f"expected an open expert store, found {self.path} closed")
        index = self._record_index(layer, expert)
        record = byte_view(out, self.layout.record_nbytes, "read_into")[: self.layout.record_nbytes]
        offset = self.data_offset + index * self.layout.record_nbytes
        if self.direct and record.ctypes.data % ALIGN == 0:
            try:
                pread_full(self._direct_fd, record, offset)
            except OSError as e:
                self.direct = False  # for good: the buffered fd serves every later read
                self.direct_error = f"O_DIRECT read failed at offset {offset}: {e}"
                pread_full(self._fd, record, offset)
        else:
            pread_full(self._fd, record, offset)
        found = zlib.crc32(record[: self.layout.payload_nbytes])
        if found != self.crc32[index]:
            raise StoreChecksumError(
                f"{self.path}: record of layer {layer}, expert {expert} (offset {offset}) should have crc32 "
                f"{self.crc32[index]:#010x}, found {found:#010x}; the file is corrupt there "
                "(record_from_checkpoint rebuilds the bytes; delete the store to rebuild it)"
            )

    def record_from_checkpoint(self, layer: int, expert: int, out: Any) -> None:
        """Fills out[:payload_nbytes] with the bytes of record (layer, expert), built from the
        checkpoint's safetensors rather than read from the store (the fallback for a corrupt record)."""
        self._record_index(layer, expert)
        payload = byte_view(out, self.layout.payload_nbytes, "record_from_checkpoint")
        pack_record(self.checkpoint, self.layout, layer, expert, payload)

    def repair_record(self, layer: int, expert: int, payload: Any) -> bool:
        """Rewrites record (layer, expert) in place with `payload` (its payload_nbytes, rebuilt by
        record_from_checkpoint after a failed checksum) and zero padding: written, fsynced, then
        read back and checked against the header's crc32. Thread-safe. True once the record reads
        back right; False, with repair_error saying why, when the bytes do not match the header's
        crc32 (nothing is written), the file cannot be written (read-only, another file renamed
        over it since it was opened) or it still reads back wrong. The reads of this run are right
        either way: the caller computes with `payload`."""
        index = self._record_index(layer, expert)
        lay = self.layout
        data = byte_view(payload, lay.payload_nbytes, "repair_record")[: lay.payload_nbytes]
        where = f"{self.path}: record of layer {layer}, expert {expert}"
        found = zlib.crc32(data)
        if found != self.crc32[index]:
            self.repair_error = (
                f"{where}: expected bytes with the header's crc32 {self.crc32[index]:#010x} to write, "
                f"found {found:#010x}; left as it was"
            )
            return False
        record = aligned_buffer(lay.record_nbytes)
        record[: lay.payload_nbytes] = data
        record[lay.payload_nbytes :] = 0
        offset = self.data_offset + index * lay.record_nbytes
        with self._repair_lock:
            try:
                fd = self._writable_fd()
                pwrite_full(fd, record, offset)
                os.fsync(fd)
            except (OSError, StoreError) as e:
                self.repair_error = f"{where}: could not be rewritten ({e})"
                return False
        check = aligned_buffer(lay.record_nbytes)
        try:
            self.read_into(layer, expert, check)
        except StoreChecksumError as e:
            self.repair_error = f"rewritten, but still reads back wrong: {e}"
            return False
        self.repair_error = None
        return True

    def _writable_fd(self) -> int:
        """A write fd on the very file this store opened (never one renamed over its path since)."""
        if self._write_fd >= 0:
            return self._write_fd
        if self._fd < 0:
            raise StoreError(f"expected an open expert store, found {self.path} closed")
        fd = os.open(self.path, os.O_WRONLY)
        mine, theirs = os.fstat(self._fd), os.fstat(fd)
        if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
            os.close(fd)
            raise StoreError(f"expected the store file opened earlier at {self.path}, found it replaced by another")
        self._write_fd = fd
        return fd

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = self._write_fd = -1

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_store_folder(directory: Path) -> None:
    """Creates the store's folder if missing; OffloadConfigError when it is a file or cannot be made."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError: a file of that name; NotADirectoryError: under a file
        what = "a file" if directory.is_file() else e.strerror or str(e)
        raise OffloadConfigError(
            f"expert store folder (offload_dir): expected a folder that exists or can be created, "
            f"found {directory} ({what})"
        ) from None


@contextmanager
def build_lock(directory: Path, progress: bool) -> Iterator[bool]:
    """Holds an exclusive flock on the folder itself while a store is built in it (no lock file to
    leave behind), waiting for a build that holds it. The kernel drops the lock when its holder
    ends however it ends (kill -9, a power cut), so under it every temporary store file in the
    folder is known to be a dead build's. An flock, not a pid in the file name: a pid cannot tell
    a builder in another pid namespace (a container sharing the folder) from a dead one, and a
    reused pid keeps a dead build's file for ever. Yields whether the lock is held: a file system
    that refuses flock (some network ones) builds without it, and then nothing is removed."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        fd = -1
    locked = False
    if fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            if progress:
                print(f"moeinf: waiting for another build of an expert store in {directory}", file=sys.stderr)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:
                pass
        except OSError:
            pass
    try:
        yield locked
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Removes the temporary store files (STALE_TEMPORARY: plain files of that name only) that
    killed builds left in `directory`; the caller holds build_lock, so no live build owns one.
    Returns what it removed."""
    removed = []
    for entry in os.scandir(directory):
        if STALE_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


def build(
    checkpoint: Checkpoint, path: Path, layout: RecordLayout, meta: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """Writes the store for `checkpoint` to `path` through a temporary file; returns the full header."""
    L, E = meta["num_layers"], meta["num_experts"]
    data_offset = data_offset_for(meta, L * E)
    record = aligned_buffer(layout.record_nbytes)
    record[layout.payload_nbytes :] = 0  # padding stays zero for every record
    crcs = []
    with ExitStack() as stack:
        try:  # a failed build leaves no store and no temporary file (a killed one: see build_lock)
            f = stack.enter_context(atomic_write(path))
        except OSError as e:  # the folder exists but takes no new file (read-only, /proc, ...)
            raise OffloadConfigError(
                f"expert store folder (offload_dir): expected a folder moeinf can write the store in, "
                f"found {path.parent} (creating a file there failed: {e.strerror or e})"
            ) from None
        fd = f.fileno()  # written with pwrite only, so the file object buffers nothing
        bar = tqdm(total=L * E, desc=f"expert store ({layout.format.name})", unit="expert", disable=not progress)
        with bar:
            for layer in range(L):
                for expert in range(E):
                    pack_record(checkpoint, layout, layer, expert, record)
                    crcs.append(zlib.crc32(record[: layout.payload_nbytes]))
                    pwrite_full(fd, record, data_offset + (layer * E + expert) * layout.record_nbytes)
                    bar.update()
        full = {**meta, "data_offset": data_offset, "crc32": crcs}
        header = encode_header(full)
        if len(header) > data_offset:
            raise StoreError(f"expected the store header to fit in {data_offset} bytes, found {len(header)}")
        pwrite_full(fd, header, 0)
    return full
