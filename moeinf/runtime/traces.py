"""Expert-routing traces: which experts every token of every sequence routed to, per layer.

A trace is what the activation-aware policy learns from (its EAM collection can be warm-started
from one) and what trace replay feeds through the cache controller to compare policies without a
model or a GPU. The file format is the one in DESIGN.md ("Trace files"): an `.npz` of plain
arrays plus `meta`, a JSON string, so numpy alone can read it and a trace written on one machine
replays on any other.

Reading validates everything a consumer relies on (shapes agree with each other and with meta,
sequence offsets run from 0 to N, ids are in range, each sequence's prefill precedes its decode)
and fails with a TraceFormatError that says what was expected and what was found, so a replay
never runs on silently broken data. Writing goes through a temporary file in the same folder and
an atomic rename: a crash never leaves a half-written trace under the final name.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeinf.atomic_write import atomic_write
from moeinf.errors import TraceFormatError
from moeinf.runtime.cache.eam import DECODE, PREFILL, expert_counts

REQUIRED_META = ("model", "num_layers", "num_experts", "top_k", "source")
ARRAYS = ("experts", "weights", "seq_starts", "phase", "meta")  # lookahead is optional
NO_NEXT_LAYER = -1  # lookahead[:, L - 1]: there is no layer L to look ahead to


@dataclass
class Trace:
    """One trace. Constructing it validates it (TraceFormatError), and integer/float arrays of
    other widths are narrowed to the file format's dtypes once their values are known to fit."""

    experts: np.ndarray  # int16 [N, L, K] expert ids per token and layer
    weights: np.ndarray  # float16 [N, L, K] their routing weights
    seq_starts: np.ndarray  # int64 [S + 1] token offset of each sequence; seq_starts[S] == N
    phase: np.ndarray  # int8 [N] PREFILL (0) or DECODE (1)
    meta: dict[str, Any]  # model, num_layers, num_experts, top_k, source (+ anything else)
    # int16 [N, L, K] the experts layer l + 1's router picks from layer l's hidden state; the last
    # layer has no next one and holds NO_NEXT_LAYER (or anything in range, which is ignored)
    lookahead: np.ndarray | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_sequences(self) -> int:
        return len(self.seq_starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.experts)

    def sequence(self, i: int) -> slice:
        """The rows of sequence i (negative i counts from the end)."""
        S = self.num_sequences
        if not -S <= i < S:
            raise IndexError(f"sequence index: expected -{S} <= i < {S}, found {i}")
        i %= S
        return slice(int(self.seq_starts[i]), int(self.seq_starts[i + 1]))

    def eam(self, i: int, phase: int | None = None) -> np.ndarray:
        """[L, E] int32: tokens sequence i routed to each expert of each layer; prefill and decode
        summed (what the runtime hands CachePolicy.sequence_finished), or only `phase`'s tokens."""
        rows = self.sequence(i)
        ids = self.experts[rows]  # [n, L, K]
        if phase is not None:
            ids = ids[self.phase[rows] == phase]
        return expert_counts(ids, self.num_experts).astype(np.int32)


def read_trace(path: str | os.PathLike) -> Trace:
    """Loads and validates a trace file. Raises FileNotFoundError if there is none, and
    TraceFormatError for anything malformed."""
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise TraceFormatError(f"{path}: expected an .npz trace archive, found a file numpy cannot read ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise TraceFormatError(f"{path}: expected an .npz trace archive, found a single .npy array")
    with archive:
        missing = [name for name in ARRAYS if name not in archive.files]
        if missing:
            raise TraceFormatError(
                f"{path}: expected arrays {', '.join(ARRAYS)} (and optionally lookahead), "
                f"found {', '.join(sorted(archive.files)) or 'none'}; missing {', '.join(missing)}"
            )
        try:
            arrays = {name: archive[name] for name in archive.files if name in ARRAYS + ("lookahead",)}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise TraceFormatError(f"{path}: an array of the archive is unreadable or truncated ({e})") from e
    meta_raw = arrays.pop("meta")
    if meta_raw.shape != () or meta_raw.dtype.kind not in "US":
        raise TraceFormatError(f"{path}: meta: expected a JSON string, found a {meta_raw.dtype} array {meta_raw.shape}")
    try:
        meta = json.loads(str(meta_raw))
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: meta: expected a JSON object, found text that is not JSON ({e})") from e
    try:
        return Trace(meta=meta, lookahead=arrays.pop("lookahead", None), **arrays)
    except TraceFormatError as e:
        raise TraceFormatError(f"{path}: {e}") from None


def write_trace(path: str | os.PathLike, trace: Trace) -> None:
    """Writes `trace` to `path` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    arrays = {
        "experts": trace.experts,
        "weights": trace.weights,
        "seq_starts": trace.seq_starts,
        "phase": trace.phase,
        "meta": np.array(json.dumps(trace.meta)),
    }
    if trace.lookahead is not None:
        arrays["lookahead"] = trace.lookahead
    with atomic_write(path) as f:
        np.savez(f, **arrays)


@dataclass
class _Sequence:
    name: str
    experts: list[np.ndarray] = field(default_factory=list)  # each [T, L, K]
    weights: list[np.ndarray] = field(default_factory=list)  # each [T, L, K]
    phase: list[np.ndarray] = field(default_factory=list)  # each [T]
    lookahead: list[np.ndarray] = field(default_factory=list)  # each [T, L, K]
    decoding: bool = False  # a decode token was added: no prefill may follow


class TraceBuilder:
    """Accumulates per-token routing, sequence by sequence, and produces a Trace.

    Sequences are keyed by any hashable (a request id); tokens of different sequences may be
    interleaved, as in batched decode. A sequence's rows stay in the order they were added, and
    sequences appear in the trace in the order they started. finish(key) closes a sequence, so the
    same key may start a new one later. The builder holds every token added until build(), so it
    grows with the trace: record bounded runs with it.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, model: str, source: str, **meta: Any):
        self.meta = {
            "model": model,
            "num_layers": num_layers,
            "num_experts": num_experts,
            "top_k": top_k,
            "source": source,
            **meta,
        }
        _check_meta(self.meta)
        self._open: dict[Hashable, _Sequence] = {}
        self._all: list[_Sequence] = []
        self._with_lookahead: bool | None = None  # fixed by the first token added

    def add_tokens(
        self,
        seq: Hashable,
        experts: np.ndarray,
        weights: np.ndarray,
        phase: int,
        lookahead: np.ndarray | None = None,
    ) -> None:
        """experts, weights: [T, L, K] routing of T consecutive tokens of `seq` in one phase;
        lookahead: [T, L, K] or [T, L - 1, K]."""
        L, E, K = self.meta["num_layers"], self.meta["num_experts"], self.meta["top_k"]
        experts, weights = np.asarray(experts), np.asarray(weights)
        if experts.ndim != 3 or experts.shape[1:] != (L, K):
            raise TraceFormatError(f"experts: expected [T, {L}, {K}], found {list(experts.shape)}")
        if weights.shape != experts.shape:
            raise TraceFormatError(f"weights: expected {list(experts.shape)} like experts, found {list(weights.shape)}")
        if phase not in (PREFILL, DECODE):
            raise TraceFormatError(f"phase: expected {PREFILL} (prefill) or {DECODE} (decode), found {phase!r}")
        has_lookahead = lookahead is not None
        if self._with_lookahead is None:
            self._with_lookahead = has_lookahead
        elif has_lookahead != self._with_lookahead:
            expected = "with" if self._with_lookahead else "without"
            raise TraceFormatError(
                f"lookahead: expected every token {expected} it (as the first), found one that differs"
            )
        if has_lookahead:
            lookahead = np.asarray(lookahead)
            T = len(experts)
            if lookahead.shape == (T, L - 1, K):
                lookahead = np.concatenate([lookahead, np.full((T, 1, K), NO_NEXT_LAYER, lookahead.dtype)], axis=1)
            if lookahead.shape != (T, L, K):
                raise TraceFormatError(
                    f"lookahead: expected [{T}, {L}, {K}] or [{T}, {L - 1}, {K}], found {list(lookahead.shape)}"
                )
        _check_ids("experts", experts, E)
        sequence = self._open.get(seq)
        if sequence is None:
            sequence = self._open[seq] = _Sequence(str(seq))
            self._all.append(sequence)
        if phase == PREFILL and sequence.decoding:
            raise TraceFormatError(
                f"sequence {seq!r}: expected prefill tokens before decode ones, found prefill after decode"
            )
        sequence.decoding |= phase == DECODE
        sequence.experts.append(experts.astype(np.int16))
        sequence.weights.append(weights.astype(np.float16))
        sequence.phase.append(np.full(len(experts), phase, np.int8))
        if has_lookahead:
            sequence.lookahead.append(lookahead.astype(np.int16))

    def finish(self, seq: Hashable) -> None:
        """Closes `seq`: tokens added under the same key later start a new sequence."""
        if self._open.pop(seq, None) is None:
            raise KeyError(f"sequence {seq!r}: expected an open sequence, found none by that key")

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for s in self._all for p in s.phase)

    def build(self) -> Trace:
        """The trace of every sequence added so far (sequences without tokens are left out)."""
        sequences = [s for s in self._all if s.experts]
        L, K = self.meta["num_layers"], self.meta["top_k"]
        lengths = [sum(len(p) for p in s.phase) for s in sequences]

        def cat(parts: list[np.ndarray], shape: tuple[int, ...], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(shape, dtype)

        lookahead = None
        if self._with_lookahead:
            lookahead = cat([a for s in sequences for a in s.lookahead], (0, L, K), np.int16)
        return Trace(
            experts=cat([a for s in sequences for a in s.experts], (0, L, K), np.int16),
            weights=cat([a for s in sequences for a in s.weights], (0, L, K), np.float16),
            seq_starts=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
            phase=cat([a for s in sequences for a in s.phase], (0,), np.int8),
            meta={**self.meta, "sequences": [s.name for s in sequences]},
            lookahead=lookahead,
        )


# ---------------------------------------------------------------------------------- validation


def _check_meta(meta: Any) -> None:
    if not isinstance(meta, dict):
        raise TraceFormatError(f"meta: expected a JSON object, found {type(meta).__name__}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise TraceFormatError(
            f"meta: expected keys {', '.join(REQUIRED_META)}, found {', '.join(sorted(meta)) or 'none'}; "
            f"missing {', '.join(missing)}"
        )
    for key in ("num_layers", "num_experts", "top_k"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TraceFormatError(f"meta.{key}: expected a positive integer, found {value!r}")
    if meta["num_experts"] > np.iinfo(np.int16).max:
        raise TraceFormatError(
            f"meta.num_experts: expected at most {np.iinfo(np.int16).max} (ids are int16), found {meta['num_experts']}"
        )
    if meta["top_k"] > meta["num_experts"]:
        raise TraceFormatError(
            f"meta.top_k: expected at most num_experts ({meta['num_experts']}), found {meta['top_k']}"
        )
    for key in ("model", "source"):
        if not isinstance(meta[key], str):
            raise TraceFormatError(f"meta.{key}: expected a string, found {meta[key]!r}")


def _as_dtype(name: str, array: Any, kind: str, dtype: type) -> np.ndarray:
    """Narrows `array` to `dtype` if it is of the right kind ('i' integer, 'f' float); the caller
    checks that its values fit."""
    array = np.asarray(array)
    kinds = "iu" if kind == "i" else "f"
    if array.dtype.kind not in kinds:
        expected = "an integer" if kind == "i" else "a floating-point"
        raise TraceFormatError(f"{name}: expected {expected} array ({np.dtype(dtype).name}), found {array.dtype}")
    return array


def _check_ids(name: str, ids: np.ndarray, num_experts: int, low: int = 0) -> None:
    if ids.size == 0:
        return
    bad = (ids < low) | (ids >= num_experts)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TraceFormatError(
            f"{name}: expected expert ids in [{low}, {num_experts}), found {int(ids[where])} at index {list(where)}"
        )


def _validate(trace: Trace) -> None:
    _check_meta(trace.meta)
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    experts = _as_dtype("experts", trace.experts, "i", np.int16)
    if experts.ndim != 3 or experts.shape[1:] != (L, K):
        raise TraceFormatError(
            f"experts: expected [N, {L}, {K}] (meta num_layers={L}, top_k={K}), found {list(experts.shape)}"
        )
    N = experts.shape[0]
    _check_ids("experts", experts, E)
    if K > 1 and N:
        ordered = np.sort(experts, axis=-1)
        repeats = ordered[..., 1:] == ordered[..., :-1]
        if repeats.any():
            n, layer = (int(i) for i in np.argwhere(repeats.any(axis=-1))[0])
            raise TraceFormatError(
                f"experts: expected {K} distinct experts per token and layer, found {experts[n, layer].tolist()} "
                f"at token {n}, layer {layer}"
            )
    weights = _as_dtype("weights", trace.weights, "f", np.float16)
    if weights.shape != experts.shape:
        raise TraceFormatError(f"weights: expected {list(experts.shape)} like experts, found {list(weights.shape)}")
    weights = weights.astype(np.float16, copy=False)
    if not np.isfinite(weights).all():
        raise TraceFormatError("weights: expected finite float16 routing weights, found NaN or infinity")
    starts = _as_dtype("seq_starts", trace.seq_starts, "i", np.int64)
    if starts.ndim != 1 or len(starts) < 1:
        raise TraceFormatError(f"seq_starts: expected a 1-D array [S + 1], found shape {list(starts.shape)}")
    if starts[0] != 0 or starts[-1] != N:
        raise TraceFormatError(
            f"seq_starts: expected to run from 0 to N = {N}, found {int(starts[0])} to {int(starts[-1])}"
        )
    steps = np.diff(starts)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise TraceFormatError(
            f"seq_starts: expected strictly increasing offsets (every sequence has a token), "
            f"found {int(starts[i])} then {int(starts[i + 1])} at sequence {i}"
        )
    phase = _as_dtype("phase", trace.phase, "i", np.int8)
    if phase.shape != (N,):
        raise TraceFormatError(f"phase: expected [{N}] (one per token), found {list(phase.shape)}")
    if N and not np.isin(phase, (PREFILL, DECODE)).all():
        found = sorted(set(np.unique(phase).tolist()) - {PREFILL, DECODE})
        raise TraceFormatError(f"phase: expected {PREFILL} (prefill) or {DECODE} (decode), found {found}")
    # within a sequence the phase never falls: prefill rows come first
    falls = np.flatnonzero(np.diff(phase.astype(np.int64)) < 0) + 1  # rows where decode -> prefill
    inside = falls[~np.isin(falls, starts)]
    if len(inside):
        s = int(np.searchsorted(starts, inside[0], side="right") - 1)
        raise TraceFormatError(
            f"phase: expected each sequence's prefill tokens before its decode tokens, "
            f"found prefill after decode at token {int(inside[0])} (sequence {s})"
        )
    lookahead = trace.lookahead
    if lookahead is not None:
        lookahead = _as_dtype("lookahead", lookahead, "i", np.int16)
        if lookahead.shape != experts.shape:
            raise TraceFormatError(
                f"lookahead: expected {list(experts.shape)} like experts, found {list(lookahead.shape)}"
            )
        _check_ids("lookahead", lookahead[:, : L - 1], E)
        _check_ids("lookahead (last layer)", lookahead[:, L - 1 :], E, low=NO_NEXT_LAYER)
        trace.lookahead = lookahead.astype(np.int16, copy=False)
    trace.experts = experts.astype(np.int16, copy=False)
    trace.weights = weights
    trace.seq_starts = starts.astype(np.int64, copy=False)
    trace.phase = phase.astype(np.int8, copy=False)
