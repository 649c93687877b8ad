"""The packed expert store: records hold exactly the checkpoint's experts in the compute dtype and
slot layout, a changed or damaged file is rebuilt rather than trusted, a corrupt record is named,
builds leave no debris, and reads agree whichever path (O_DIRECT, buffered, threads) they take.

The tiny Mixtral here has expert_ffn 72, so a record's payload is not a multiple of ALIGN and the
zero padding is exercised."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from moeinf.errors import MoeinfError, StoreBufferError, StoreChecksumError, StoreError, StoreRecordError
from moeinf.loaders import expert_store
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.expert_store import ALIGN, STORE_VERSION, ExpertStore, aligned_buffer, checkpoint_fingerprint
from tests.checkpoints import save_tiny_mixtral

FFN = 72  # expert_ffn: payload 3 * 72 * 64 * itemsize is not a multiple of 4096


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def single_saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("store-single")
    save_tiny_mixtral(folder, intermediate_size=FFN)
    return folder


@pytest.fixture(scope="module")
def sharded_saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("store-sharded")
    save_tiny_mixtral(folder, intermediate_size=FFN, max_shard_size="50KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.fixture
def ckpt_dir(single_saved, tmp_path) -> Path:
    """A private, writable copy of the single-file checkpoint."""
    return Path(shutil.copytree(single_saved, tmp_path / "ckpt"))


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


def expected_record(ckpt: Checkpoint, dtype: torch.dtype, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [2F, D], w2 [D, F]) in `dtype`, straight from the safetensors."""
    gate = ckpt.read("expert_gate", layer, expert)
    up = ckpt.read("expert_up", layer, expert)
    down = ckpt.read("expert_down", layer, expert)
    return torch.cat([gate, up]).to(dtype), down.to(dtype)


def unpack(store: ExpertStore, buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A payload's bytes viewed back as (w13, w2) in the store's dtype."""
    lay = store.layout
    n13 = lay.field("w13").nbytes
    w13 = torch.frombuffer(bytearray(buf[:n13]), dtype=lay.dtype).view(lay.w13_shape)
    w2 = torch.frombuffer(bytearray(buf[n13 : lay.payload_nbytes]), dtype=lay.dtype).view(lay.w2_shape)
    return w13, w2


def assert_matches_checkpoint(store: ExpertStore, ckpt: Checkpoint) -> None:
    buf = aligned_buffer(store.layout.record_nbytes)
    for layer in range(store.num_layers):
        for expert in range(store.num_experts):
            store.read_into(layer, expert, buf)
            w13, w2 = unpack(store, buf)
            want13, want2 = expected_record(ckpt, store.layout.dtype, layer, expert)
            assert torch.equal(w13, want13), (layer, expert)
            assert torch.equal(w2, want2), (layer, expert)


def all_records(store: ExpertStore) -> dict[tuple[int, int], bytes]:
    buf = aligned_buffer(store.layout.record_nbytes)
    records = {}
    for layer in range(store.num_layers):
        for expert in range(store.num_experts):
            store.read_into(layer, expert, buf)
            records[layer, expert] = bytes(buf[: store.layout.payload_nbytes])
    return records


def flip_bytes(path: Path, offset: int, count: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def open_store(ckpt_dir: Path, store_dir: Path, dtype=torch.float32, **kwargs) -> ExpertStore:
    return ExpertStore.open_or_build(Checkpoint.open(ckpt_dir), store_dir, dtype, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------- contents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_records_equal_checkpoint_experts(layout, dtype, single_saved, sharded_saved, store_dir):
    folder = single_saved if layout == "single" else sharded_saved
    ckpt = Checkpoint.open(folder)
    with ExpertStore.open_or_build(ckpt, store_dir, dtype, progress=False) as store:
        spec = ckpt.spec
        D, F = spec.hidden_size, spec.expert_ffn
        lay = store.layout
        assert (store.num_layers, store.num_experts) == (spec.num_layers, spec.num_experts)
        assert (lay.w13_shape, lay.w2_shape, lay.dtype) == ((2 * F, D), (D, F), dtype)
        assert lay.payload_nbytes == lay.field("w13").nbytes + lay.field("w2").nbytes == 3 * F * D * dtype.itemsize
        assert lay.record_nbytes % ALIGN == 0 and 0 < lay.record_nbytes - lay.payload_nbytes < ALIGN
        assert store.built and store.path.name == f"experts-{str(dtype).removeprefix('torch.')}.moeinf"
        assert_matches_checkpoint(store, ckpt)


def test_file_format_on_disk(single_saved, store_dir):
    """The file decoded by hand, independently of the reader: header, offsets, checksums, padding."""
    ckpt = Checkpoint.open(single_saved)
    with ExpertStore.open_or_build(ckpt, store_dir, torch.bfloat16, progress=False) as store:
        lay, E = store.layout, store.num_experts
        read = {}  # (layer, expert) -> the record as the reader reads it
        for la in range(store.num_layers):
            for e in range(E):
                read[(la, e)] = aligned_buffer(lay.record_nbytes)
                store.read_into(la, e, read[(la, e)])
    raw = store.path.read_bytes()
    magic, version, reserved, json_len = struct.unpack_from("<8sIIQ", raw)
    assert (magic, version, reserved) == (b"MOEINFXS", STORE_VERSION, 0)
    meta = json.loads(raw[24 : 24 + json_len].decode())
    assert meta["fingerprint"] == checkpoint_fingerprint(ckpt, ExpertFormat.float(torch.bfloat16))
    assert meta["format"]["kind"] == "float" and meta["format"]["dtype"] == "bfloat16"
    assert (meta["num_layers"], meta["num_experts"]) == (ckpt.spec.num_layers, ckpt.spec.num_experts)
    assert meta["w13_shape"] == list(lay.w13_shape) and meta["w2_shape"] == list(lay.w2_shape)
    assert meta["record_nbytes"] == lay.record_nbytes
    data_offset = meta["data_offset"]
    assert data_offset % ALIGN == 0 and data_offset >= 24 + json_len
    assert len(raw) == data_offset + len(read) * lay.record_nbytes
    for (layer, expert), record in read.items():
        offset = data_offset + (layer * E + expert) * lay.record_nbytes
        assert record[: lay.payload_nbytes].tobytes() == raw[offset : offset + lay.payload_nbytes]
        payload = raw[offset : offset + lay.payload_nbytes]
        want13, want2 = expected_record(ckpt, torch.bfloat16, layer, expert)
        assert payload == want13.view(torch.uint8).numpy().tobytes() + want2.view(torch.uint8).numpy().tobytes()
        assert meta["crc32"][layer * E + expert] == zlib.crc32(payload)
        padding = raw[offset + lay.payload_nbytes : offset + lay.record_nbytes]
        assert padding == bytes(lay.record_nbytes - lay.payload_nbytes)


# --------------------------------------------------------------------------------------------- reuse and rebuild


def test_reopen_reuses_the_file(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as first:
        assert first.built and first.rebuild_reason == "no store file yet"
    before = first.path.stat()
    with open_store(ckpt_dir, store_dir) as again:
        assert not again.built and again.rebuild_reason is None
        after = again.path.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
        assert_matches_checkpoint(again, Checkpoint.open(ckpt_dir))
    with open_store(ckpt_dir, store_dir, torch.bfloat16) as other_dtype:
        assert other_dtype.built and other_dtype.path != first.path
    assert sorted(p.name for p in store_dir.iterdir()) == ["experts-bfloat16.moeinf", "experts-float32.moeinf"]


@pytest.mark.parametrize("change", ["config", "mtime", "weights"])
def test_changed_checkpoint_rebuilds(change, ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as old:
        old_records = all_records(old)
    if change == "config":
        config = json.loads((ckpt_dir / "config.json").read_text())
        (ckpt_dir / "config.json").write_text(json.dumps({**config, "moeinf_test_note": 1}))
    elif change == "mtime":
        weights = ckpt_dir / "model.safetensors"
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    else:
        save_tiny_mixtral(ckpt_dir, seed=1, intermediate_size=FFN)
    ckpt = Checkpoint.open(ckpt_dir)
    with ExpertStore.open_or_build(ckpt, store_dir, torch.float32, progress=False) as new:
        assert new.built and "fingerprint" in new.rebuild_reason
        assert_matches_checkpoint(new, ckpt)
        if change == "weights":
            assert all_records(new)[0, 0] != old_records[0, 0]
    assert [p.name for p in store_dir.iterdir()] == ["experts-float32.moeinf"]


def corrupt_magic(path: Path) -> None:
    flip_bytes(path, 0, 8)


def corrupt_version(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", STORE_VERSION + 1))


def corrupt_json(path: Path) -> None:
    flip_bytes(path, 24 + 5, 20)


def corrupt_json_length(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", 1 << 60))


def truncate_last_record(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def truncate_into_header(path: Path) -> None:
    os.truncate(path, 10)


def empty_file(path: Path) -> None:
    os.truncate(path, 0)


@pytest.mark.parametrize(
    "damage",
    [
        corrupt_magic,
        corrupt_version,
        corrupt_json,
        corrupt_json_length,
        truncate_last_record,
        truncate_into_header,
        empty_file,
    ],
)
def test_damaged_store_is_rebuilt(damage, ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as store:
        path = store.path
    damage(path)
    with open_store(ckpt_dir, store_dir) as rebuilt:
        assert rebuilt.built and rebuilt.rebuild_reason
        assert_matches_checkpoint(rebuilt, Checkpoint.open(ckpt_dir))
    with open_store(ckpt_dir, store_dir) as reopened:
        assert not reopened.built


# --------------------------------------------------------------------------------------------- corruption


def test_corrupt_record_is_named_and_rebuildable(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as store:
        lay = store.layout
        flip_bytes(
            store.path, store.data_offset + (1 * store.num_experts + 2) * lay.record_nbytes + lay.payload_nbytes // 2
        )
    with open_store(ckpt_dir, store_dir) as store:
        assert not store.built  # the header is intact: records are checked when read, not when opened
        ckpt = Checkpoint.open(ckpt_dir)
        buf = aligned_buffer(lay.record_nbytes)
        with pytest.raises(StoreChecksumError, match=r"layer 1, expert 2 .*crc32 0x[0-9a-f]{8}, found 0x[0-9a-f]{8}"):
            store.read_into(1, 2, buf)
        with pytest.raises(MoeinfError):
            store.read_into(1, 2, buf)
        fresh = aligned_buffer(lay.payload_nbytes)
        store.record_from_checkpoint(1, 2, fresh)
        w13, w2 = unpack(store, fresh)
        want13, want2 = expected_record(ckpt, torch.float32, 1, 2)
        assert torch.equal(w13, want13) and torch.equal(w2, want2)
        assert zlib.crc32(fresh) == store.crc32[1 * store.num_experts + 2]
        for layer in range(store.num_layers):
            for expert in range(store.num_experts):
                if (layer, expert) != (1, 2):
                    store.read_into(layer, expert, buf)
                    w13, w2 = unpack(store, buf)
                    want13, want2 = expected_record(ckpt, torch.float32, layer, expert)
                    assert torch.equal(w13, want13) and torch.equal(w2, want2)


def corrupt(store: ExpertStore, layer: int, expert: int) -> None:
    lay = store.layout
    flip_bytes(store.path, store.data_offset + (layer * store.num_experts + expert) * lay.record_nbytes + 100)


def test_a_rebuilt_record_is_repaired_in_place(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as store:
        want = all_records(store)
        corrupt(store, 1, 2)
    size = store.path.stat().st_size
    with open_store(ckpt_dir, store_dir) as store:
        buf = aligned_buffer(store.layout.record_nbytes)
        with pytest.raises(StoreChecksumError):
            store.read_into(1, 2, buf)
        buf[:] = 0xAB  # what a failed read leaves behind; the repair writes zero padding of its own
        store.record_from_checkpoint(1, 2, buf)
        assert store.repair_record(1, 2, buf) and store.repair_error is None
        store.read_into(1, 2, buf)  # reads back clean through the same handle
    with open_store(ckpt_dir, store_dir) as store:
        assert not store.built and all_records(store) == want  # the others untouched
        with store.path.open("rb") as f:
            f.seek(store.data_offset + (1 * store.num_experts + 2) * store.layout.record_nbytes)
            record = f.read(store.layout.record_nbytes)
        assert record[store.layout.payload_nbytes :] == bytes(store.layout.record_nbytes - store.layout.payload_nbytes)
    assert store.path.stat().st_size == size


def test_a_repair_with_bytes_that_fail_the_checksum_writes_nothing(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as store:
        corrupt(store, 0, 1)
        before = store.path.read_bytes()
        wrong = aligned_buffer(store.layout.record_nbytes)
        wrong[:] = 7
        assert not store.repair_record(0, 1, wrong)
        assert "crc32" in store.repair_error and "layer 0, expert 1" in store.repair_error
    assert store.path.read_bytes() == before


def test_a_repair_leaves_a_store_file_replaced_since_it_was_opened_alone(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir) as store:
        corrupt(store, 0, 1)
        replacement = store_dir / "replacement"
        shutil.copyfile(store.path, replacement)
        os.replace(replacement, store.path)  # another build renamed a new file into place
        before = store.path.read_bytes()
        buf = aligned_buffer(store.layout.record_nbytes)
        store.record_from_checkpoint(0, 1, buf)
        assert not store.repair_record(0, 1, buf)
        assert "replaced" in store.repair_error
    assert store.path.read_bytes() == before


# --------------------------------------------------------------------------------------------- build hygiene


def test_build_leaves_no_temporary_file(ckpt_dir, store_dir):
    with open_store(ckpt_dir, store_dir, torch.bfloat16):
        pass
    assert [p.name for p in store_dir.iterdir()] == ["experts-bfloat16.moeinf"]


def test_failed_build_leaves_nothing(ckpt_dir, store_dir, monkeypatch):
    ckpt = Checkpoint.open(ckpt_dir)
    real_read = ckpt.read
    calls = []

    def failing_read(role, layer=None, expert=None):
        calls.append(role)
        if len(calls) > 10:
            raise RuntimeError("disk went away")
        return real_read(role, layer, expert)

    monkeypatch.setattr(ckpt, "read", failing_read)
    with pytest.raises(RuntimeError, match="disk went away"):
        ExpertStore.open_or_build(ckpt, store_dir, torch.float32, progress=False)
    assert list(store_dir.iterdir()) == []


def test_failed_rebuild_keeps_distrusting_the_stale_file(ckpt_dir, store_dir, monkeypatch):
    with open_store(ckpt_dir, store_dir):
        pass
    (ckpt_dir / "config.json").write_text((ckpt_dir / "config.json").read_text() + "\n")
    ckpt = Checkpoint.open(ckpt_dir)

    def failing_read(role, layer=None, expert=None):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ckpt, "read", failing_read)
    with pytest.raises(RuntimeError):
        ExpertStore.open_or_build(ckpt, store_dir, torch.float32, progress=False)
    assert [p.name for p in store_dir.iterdir()] == ["experts-float32.moeinf"]
    monkeypatch.undo()
    with open_store(ckpt_dir, store_dir) as store:
        assert store.built
        assert_matches_checkpoint(store, Checkpoint.open(ckpt_dir))


# a builder in another process: builds the store, with a pause after each record so that it can be
# caught mid-build (killed, or raced by a second build)
SLOW_BUILDER = """
import sys, time, torch
from moeinf.loaders import expert_store
from moeinf.loaders.checkpoint import Checkpoint
pack, pause = expert_store.pack_record, float(sys.argv[3])
def slow_pack(*args):
    pack(*args)
    time.sleep(pause)
expert_store.pack_record = slow_pack
expert_store.ExpertStore.open_or_build(Checkpoint.open(sys.argv[1]), sys.argv[2], torch.float32, progress=False)
"""


def start_builder(ckpt_dir: Path, store_dir: Path, pause: float) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-c", SLOW_BUILDER, str(ckpt_dir), str(store_dir), str(pause)]
    return subprocess.Popen(args, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


def wait_for_temporary_file(store_dir: Path, builder: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = list(store_dir.glob(".experts-float32.moeinf.*.tmp")) if store_dir.exists() else []
        if found:
            return found[0]
        assert builder.poll() is None, "the builder ended before it began writing"
        time.sleep(0.05)
    raise AssertionError("the builder wrote no temporary file in time")


# files of the folder that look a little like a build's temporary file, but are not moeinf's
NOT_OURS = (
    "notes.txt",
    ".experts-float32.moeinf.tmp",
    "experts-float32.moeinf.abcd1234.tmp",
    ".other.moeinf.abcd1234.tmp",
    ".experts-float32.moeinf.abcd1234.tmp.keep",
)


def test_a_build_removes_the_temporary_files_of_killed_builds(ckpt_dir, store_dir):
    builder = start_builder(ckpt_dir, store_dir, pause=60)
    stale = wait_for_temporary_file(store_dir, builder)
    builder.send_signal(signal.SIGKILL)  # kill -9 mid-build: no cleanup runs in the builder
    builder.wait()
    other_dtype = store_dir / ".experts-bfloat16.moeinf.zz_9yx8w.tmp"  # another store's, killed as well
    other_dtype.write_bytes(b"partial")
    for name in NOT_OURS:
        (store_dir / name).write_text("user data")
    (store_dir / ".experts-float32.moeinf.folder00.tmp").mkdir()  # not a file: never ours
    assert stale.exists()
    with open_store(ckpt_dir, store_dir) as store:
        assert store.built
        assert_matches_checkpoint(store, Checkpoint.open(ckpt_dir))
    assert not stale.exists() and not other_dtype.exists()
    left = sorted(p.name for p in store_dir.iterdir())
    assert left == sorted([*NOT_OURS, ".experts-float32.moeinf.folder00.tmp", "experts-float32.moeinf"])
    assert all((store_dir / name).read_text() == "user data" for name in NOT_OURS)


def test_a_build_beside_a_running_build_waits_and_breaks_nothing(ckpt_dir, store_dir):
    builder = start_builder(ckpt_dir, store_dir, pause=0.3)  # 8 records: about 2.4 s
    live = wait_for_temporary_file(store_dir, builder)
    with open_store(ckpt_dir, store_dir) as store:  # waits for the running build, then reuses its file
        assert builder.wait(timeout=60) == 0  # its temporary file was not taken from under it
        assert not store.built
        assert_matches_checkpoint(store, Checkpoint.open(ckpt_dir))
    assert not live.exists()
    assert [p.name for p in store_dir.iterdir()] == ["experts-float32.moeinf"]


# --------------------------------------------------------------------------------------------- read paths


def test_direct_and_buffered_reads_agree(single_saved, store_dir):
    with open_store(single_saved, store_dir) as direct, open_store(single_saved, store_dir, direct=False) as buffered:
        assert not buffered.direct
        assert direct.direct or direct.direct_error  # O_DIRECT either engaged or says why not
        assert all_records(direct) == all_records(buffered)


def test_unaligned_and_other_buffers(single_saved, store_dir):
    with open_store(single_saved, store_dir) as store:
        n = store.layout.record_nbytes
        reference = aligned_buffer(n)
        store.read_into(1, 3, reference)
        base = aligned_buffer(n + 1)
        unaligned = base[1:]
        assert unaligned.ctypes.data % ALIGN == 1
        store.read_into(1, 3, unaligned)
        assert np.array_equal(unaligned, reference)
        target = bytearray(n + 100)
        store.read_into(1, 3, target)
        assert target[:n] == reference.tobytes()
        as_tensor = torch.empty(n // 2, dtype=torch.bfloat16)
        store.read_into(1, 3, as_tensor)
        assert as_tensor.view(torch.uint8).numpy().tobytes() == reference.tobytes()
        assert store.direct or store.direct_error


def test_bad_buffers_and_indices_are_named(single_saved, store_dir):
    with open_store(single_saved, store_dir) as store:
        n = store.layout.record_nbytes
        with pytest.raises(StoreBufferError, match=f"at least {n} bytes, found {n - 1}"):
            store.read_into(0, 0, aligned_buffer(n - 1))
        with pytest.raises(StoreBufferError, match="expected a buffer of at least"):
            store.read_into(0, 0, aligned_buffer(store.layout.payload_nbytes))  # payload alone is not enough
        with pytest.raises(StoreBufferError, match="read-only"):
            store.read_into(0, 0, bytes(n))
        with pytest.raises(StoreBufferError, match="contiguous"):
            store.read_into(0, 0, aligned_buffer(2 * n)[::2])
        with pytest.raises(StoreRecordError, match="found layer 2, expert 0"):
            store.read_into(2, 0, aligned_buffer(n))
        with pytest.raises(StoreRecordError, match="found layer 0, expert -1"):
            store.read_into(0, -1, aligned_buffer(n))
    with pytest.raises(StoreError, match="closed"):
        store.read_into(0, 0, aligned_buffer(n))


def test_concurrent_reads(single_saved, store_dir):
    with open_store(single_saved, store_dir, direct=False) as reference:
        want = all_records(reference)
    with open_store(single_saved, store_dir) as store:
        n, payload = store.layout.record_nbytes, store.layout.payload_nbytes
        jobs = list(want) * 16
        random.Random(0).shuffle(jobs)

        def read(job: tuple[int, int]) -> bool:
            # alternate aligned (direct-capable) and unaligned (buffered) targets
            buf = aligned_buffer(n) if hash(job) % 2 else aligned_buffer(n + 8)[8:]
            store.read_into(*job, buf)
            return bytes(buf[:payload]) == want[job]

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(read, jobs))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_refused_direct_open_falls_back(single_saved, store_dir, monkeypatch):
    with open_store(single_saved, store_dir, direct=False):
        pass
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(expert_store.os, "open", refusing_open)
    with open_store(single_saved, store_dir) as store:
        assert not store.direct and "Invalid argument" in store.direct_error
        assert_matches_checkpoint(store, Checkpoint.open(single_saved))


def test_failing_direct_read_falls_back_for_good(single_saved, store_dir, monkeypatch):
    with open_store(single_saved, store_dir) as store:
        if not store.direct:
            pytest.skip(f"O_DIRECT not engaged here: {store.direct_error}")
        real_preadv = os.preadv
        direct_reads = []

        def failing_on_direct(fd, buffers, offset):
            if fd == store._direct_fd:
                direct_reads.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(expert_store.os, "preadv", failing_on_direct)
        assert_matches_checkpoint(store, Checkpoint.open(single_saved))
        assert not store.direct and "Invalid argument" in store.direct_error
        assert len(direct_reads) == 1


# --------------------------------------------------------------------------------------------- helpers of the module


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 20])
def test_aligned_buffer(nbytes):
    buf = aligned_buffer(nbytes)
    assert buf.dtype == np.uint8 and buf.nbytes == nbytes and buf.flags.writeable and buf.flags.c_contiguous
    assert buf.ctypes.data % ALIGN == 0
    buf[:] = 7  # writable over its whole length


def test_aligned_buffer_rejects_negative():
    with pytest.raises(StoreBufferError, match="found -1"):
        aligned_buffer(-1)


def test_fingerprint_tracks_dtype_and_files(ckpt_dir):
    ckpt = Checkpoint.open(ckpt_dir)
    first = checkpoint_fingerprint(ckpt, ExpertFormat.float(torch.float32))
    assert first == checkpoint_fingerprint(Checkpoint.open(ckpt_dir), ExpertFormat.float(torch.float32))
    assert len(first) == 64 and int(first, 16) >= 0
    assert first != checkpoint_fingerprint(ckpt, ExpertFormat.float(torch.bfloat16))
    assert first != checkpoint_fingerprint(ckpt, ExpertFormat("int8"))
    weights = ckpt_dir / "model.safetensors"
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1))
    assert first != checkpoint_fingerprint(ckpt, ExpertFormat.float(torch.float32))
