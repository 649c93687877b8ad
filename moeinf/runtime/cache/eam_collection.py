"""The Expert Activation Matrix Collection (EAMC): what past sequences routed, kept to predict
what a running sequence will route next (MoE-Infinity, arXiv 2401.14361).

A finished sequence's EAM (an [L, E] matrix of token counts) goes in with its rows normalised to
probabilities, so that long and short sequences weigh alike and a member can be mixed directly
into a prediction. The collection has a fixed capacity (memory stays bounded however long the
server runs); once full, a new EAM replaces the member most similar to it (cosine), which keeps
the collection diverse: a burst of look-alike requests refreshes one member instead of pushing
out every other kind of request. It is saved atomically (moeinf/atomic_write.py: a temporary file, then a rename), so
a crash mid-save leaves the previous file whole, and it can be warm-started from a routing trace.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from moeinf.atomic_write import atomic_write
from moeinf.errors import EAMCError
from moeinf.runtime.cache.eam import expert_counts

FORMAT_VERSION = 1


def normalise_rows(eam: np.ndarray) -> np.ndarray:
    """eam: [..., L, E] counts -> the same with every non-empty row summing to 1 (float64);
    empty rows stay zero."""
    eam = np.asarray(eam, dtype=np.float64)
    totals = eam.sum(axis=-1, keepdims=True)
    return np.divide(eam, totals, out=np.zeros_like(eam), where=totals > 0)


def _field(trace: Any, name: str) -> Any:
    """A trace field by attribute (Trace, SimpleNamespace) or by key (np.load of a .npz)."""
    if hasattr(trace, name):
        return getattr(trace, name)
    try:
        return trace[name]
    except (KeyError, TypeError, IndexError):
        raise EAMCError(f"routing trace: expected a field {name!r}, found none") from None


class EAMCollection:
    def __init__(self, num_layers: int, num_experts: int, capacity: int):
        for what, value in (("num_layers", num_layers), ("num_experts", num_experts), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EAMCError(f"EAMC {what}: expected a positive integer, found {value!r}")
        self.num_layers, self.num_experts, self.capacity = int(num_layers), int(num_experts), int(capacity)
        self._members = np.zeros((self.capacity, self.num_layers, self.num_experts))  # [C, L, E] row-normalised
        self._row_norms2 = np.zeros((self.capacity, self.num_layers))  # [C, L] squared norm of each member row
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def members(self) -> np.ndarray:
        """[n, L, E] the members, rows normalised (a view: do not write)."""
        return self._members[: self.size]

    def _check_eam(self, eam: np.ndarray) -> np.ndarray:
        eam = np.asarray(eam)
        if eam.shape != (self.num_layers, self.num_experts):
            raise EAMCError(f"EAM: expected shape ({self.num_layers}, {self.num_experts}), found {eam.shape}")
        if not np.issubdtype(eam.dtype, np.number) or not np.isfinite(eam).all() or (eam < 0).any():
            raise EAMCError(f"EAM: expected finite non-negative token counts, found dtype {eam.dtype}")
        return eam

    def insert(self, eam: np.ndarray) -> int:
        """eam: [L, E] token counts of a finished sequence. Returns the member index it took: the
        next free one, or, when full, that of the member most similar to it. An EAM without any
        token is ignored (returns -1)."""
        row = normalise_rows(self._check_eam(eam))
        if not row.any():
            return -1
        if self.size < self.capacity:
            index = self.size
            self.size += 1
        else:
            index = int(np.argmax(cosine(self.members, row)))
        self._store(index, row)
        return index

    def _store(self, index: int, member: np.ndarray) -> None:
        self._members[index] = member
        self._row_norms2[index] = np.square(member).sum(axis=1)

    def similarity(self, running: np.ndarray, seen: int) -> np.ndarray:
        """running: [L, E] token counts; seen: the leading layers compared. [n] cosine of
        running[:seen] with each member's first `seen` rows (0 where either is all zeros)."""
        part = running[:seen]  # [seen, E]
        dots = np.einsum("nle,le->n", self.members[:, :seen], part)  # no copy of the members' prefix
        norms = np.sqrt(self._row_norms2[: self.size, :seen].sum(axis=1) * np.square(part).sum())
        return np.divide(dots, norms, out=np.zeros(self.size), where=norms > 0)

    def predict(self, running: np.ndarray, seen: int, matches: int) -> np.ndarray | None:
        """running: [L, E] token counts of the running batch; seen: how many leading layers it has
        routed (the rows compared). The `matches` members most similar to running[:seen]
        (cosine), averaged with their similarities as weights and renormalised per row (uniform
        where they routed nothing): [L, E], or None when no member is similar at all (an empty
        collection, nothing routed yet)."""
        running = self._check_eam(running)
        if self.size == 0 or seen < 1 or matches < 1:
            return None
        sims = self.similarity(running, seen)  # [n]
        k = min(matches, self.size)
        best = np.argpartition(-sims, k - 1)[:k] if k < self.size else np.arange(self.size)
        weights = np.maximum(sims[best], 0.0)  # [k]
        if weights.sum() <= 0.0:
            return None
        pred = normalise_rows(np.tensordot(weights, self.members[best], axes=1))  # [L, E]
        pred[pred.sum(axis=1) == 0.0] = 1.0 / self.num_experts  # a layer the matches never routed
        return pred

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Writes an .npz next to `path` and renames it into place, so that `path` is always
        either the previous collection or this one, never a torn file."""
        meta = {
            "format": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "capacity": self.capacity,
        }
        with atomic_write(path) as f:
            np.savez(f, members=self.members, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> EAMCollection:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                members = np.asarray(data["members"])
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise EAMCError(f"EAMC file {path}: expected an .npz with 'members' and 'meta', found {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise EAMCError(f"EAMC file {path}: expected format {FORMAT_VERSION}, found {found!r}")
        try:
            eamc = cls(meta["num_layers"], meta["num_experts"], meta["capacity"])
        except KeyError as exc:
            raise EAMCError(f"EAMC file {path}: expected meta to hold {exc}, found {sorted(meta)}") from None
        expected = (eamc.num_layers, eamc.num_experts)
        if members.ndim != 3 or members.shape[1:] != expected or len(members) > eamc.capacity:
            raise EAMCError(
                f"EAMC file {path}: expected members [<= {eamc.capacity}, {expected[0]}, {expected[1]}], "
                f"found {list(members.shape)}"
            )
        if not np.issubdtype(members.dtype, np.floating) or not np.isfinite(members).all() or (members < 0).any():
            raise EAMCError(f"EAMC file {path}: expected finite non-negative float members, found {members.dtype}")
        for index, member in enumerate(members):
            eamc._store(index, member)
        eamc.size = len(members)
        return eamc

    @classmethod
    def from_trace(cls, trace: Any, capacity: int) -> EAMCollection:
        """Warm start: one EAM per sequence of a routing trace, inserted in order (so with more
        sequences than capacity, later ones replace their most similar predecessors). `trace` is
        anything with the trace fields experts [N, L, K], seq_starts [S + 1] and meta (a dict or
        its JSON string, with num_layers and num_experts): runtime.traces.Trace, or np.load of
        a trace file."""
        meta = _field(trace, "meta")
        if not isinstance(meta, dict):
            try:
                meta = json.loads(str(meta))
            except json.JSONDecodeError:
                raise EAMCError(f"routing trace meta: expected a dict or a JSON object, found {meta!r:.80}") from None
        try:
            L, E = int(meta["num_layers"]), int(meta["num_experts"])
        except (KeyError, TypeError, ValueError):
            raise EAMCError(f"routing trace meta: expected num_layers and num_experts, found {meta!r:.200}") from None
        experts = np.asarray(_field(trace, "experts"))
        starts = np.asarray(_field(trace, "seq_starts"))
        if experts.ndim != 3 or experts.shape[1] != L or not np.issubdtype(experts.dtype, np.integer):
            raise EAMCError(
                f"routing trace experts: expected integer [N, {L}, K], found {experts.dtype} {list(experts.shape)}"
            )
        if experts.size and (experts.min() < 0 or experts.max() >= E):
            raise EAMCError(f"routing trace experts: expected ids in [0, {E}), found {experts.min()}..{experts.max()}")
        N = experts.shape[0]
        if starts.ndim != 1 or len(starts) < 1 or starts[0] != 0 or starts[-1] != N or (np.diff(starts) < 0).any():
            raise EAMCError(
                f"routing trace seq_starts: expected non-decreasing offsets from 0 to {N}, found {starts!r:.80}"
            )
        eamc = cls(L, E, capacity)
        for begin, end in itertools.pairwise(starts):
            eamc.insert(expert_counts(experts[begin:end], E))
        return eamc


def cosine(members: np.ndarray, x: np.ndarray) -> np.ndarray:
    """members: [n, ...]; x: [...] of the same trailing shape -> [n] cosine similarities (0
    where either side is all zeros)."""
    m = members.reshape(len(members), -1)
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    norms = np.linalg.norm(m, axis=1) * np.linalg.norm(v)
    return np.divide(m @ v, norms, out=np.zeros(len(m)), where=norms > 0)
