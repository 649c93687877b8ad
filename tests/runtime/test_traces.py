"""Trace files: round trips, every validation error, atomic writes, and the TraceBuilder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moeinf.errors import TraceFormatError
from moeinf.runtime.traces import NO_NEXT_LAYER, Trace, TraceBuilder, read_trace, write_trace

L, E, K = 3, 5, 2


def meta(**changes):
    return {"model": "toy", "num_layers": L, "num_experts": E, "top_k": K, "source": "test", **changes}


def arrays(n_tokens=(4, 3), lookahead=True, seed=0):
    """Valid trace arrays: sequences of the given lengths, the first token of each a prefill."""
    rng = np.random.default_rng(seed)
    N = sum(n_tokens)
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(N)])
    out = {
        "experts": experts.astype(np.int16),  # [N, L, K]
        "weights": rng.random((N, L, K)).astype(np.float16),
        "seq_starts": np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int64),
        "phase": np.ones(N, np.int8),
        "meta": meta(),
    }
    out["phase"][out["seq_starts"][:-1]] = 0
    if lookahead:
        ahead = np.roll(experts, -1, axis=1).astype(np.int16)
        ahead[:, -1] = NO_NEXT_LAYER
        out["lookahead"] = ahead
    return out


def save_raw(path, **arrays_):
    """Writes an .npz as-is (meta as a JSON string unless it is already an array)."""
    if "meta" in arrays_ and not isinstance(arrays_["meta"], np.ndarray):
        arrays_["meta"] = np.array(json.dumps(arrays_["meta"]))
    np.savez(path, **arrays_)
    return path


def test_round_trip(tmp_path):
    for lookahead in (True, False):
        t = Trace(**arrays(lookahead=lookahead))
        path = tmp_path / f"t{lookahead}.npz"
        write_trace(path, t)
        back = read_trace(path)
        for name in ("experts", "weights", "seq_starts", "phase"):
            np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
            assert getattr(back, name).dtype == getattr(t, name).dtype
        assert back.meta == t.meta
        assert (back.lookahead is None) == (not lookahead)
        if lookahead:
            np.testing.assert_array_equal(back.lookahead, t.lookahead)
        assert (back.num_layers, back.num_experts, back.top_k, back.num_sequences) == (L, E, K, 2)
        assert back.sequence(1) == slice(4, 7) and back.sequence(-2) == slice(0, 4)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_eam_counts_tokens_per_expert():
    t = Trace(**arrays())
    eam = t.eam(1)  # [L, E]
    assert eam.shape == (L, E) and eam.sum() == 3 * L * K
    rows = t.experts[4:7]
    for layer in range(L):
        np.testing.assert_array_equal(eam[layer], np.bincount(rows[:, layer].ravel(), minlength=E))
    np.testing.assert_array_equal(t.eam(1, phase=0) + t.eam(1, phase=1), eam)
    assert t.eam(1, phase=0).sum() == L * K  # the first token of each sequence is its prefill
    with pytest.raises(IndexError, match="expected -2 <= i < 2, found 2"):
        t.sequence(2)


def test_narrower_integer_dtypes_are_accepted_and_normalised():
    a = arrays()
    a["experts"] = a["experts"].astype(np.int64)
    a["seq_starts"] = a["seq_starts"].astype(np.int32)
    a["weights"] = a["weights"].astype(np.float32)
    t = Trace(**a)
    assert (t.experts.dtype, t.seq_starts.dtype, t.weights.dtype) == (np.int16, np.int64, np.float16)


def broken(name, value):
    a = arrays()
    a[name] = value
    return a


def edit(name, fn):
    a = arrays()
    a[name] = fn(a[name].copy())
    return a


def _set(index, value):
    def fn(x):
        x[index] = value
        return x

    return fn


INVALID = {
    "meta not a dict": (broken("meta", ["x"]), "meta: expected a JSON object, found list"),
    "meta missing key": (broken("meta", {k: v for k, v in meta().items() if k != "source"}), "missing source"),
    "meta bad count": (broken("meta", meta(num_layers=0)), r"meta.num_layers: expected a positive integer, found 0"),
    "meta bool count": (broken("meta", meta(top_k=True)), r"meta.top_k: expected a positive integer, found True"),
    "meta top_k > E": (broken("meta", meta(top_k=6)), r"meta.top_k: expected at most num_experts \(5\), found 6"),
    "meta model type": (broken("meta", meta(model=3)), r"meta.model: expected a string, found 3"),
    "experts float": (edit("experts", lambda x: x.astype(np.float32)), "experts: expected an integer array"),
    "experts layers": (edit("experts", lambda x: x[:, :2]), r"experts: expected \[N, 3, 2\].*found \[7, 2, 2\]"),
    "experts id high": (edit("experts", _set((5, 1, 0), 5)), r"expert ids in \[0, 5\), found 5 at index \[5, 1, 0\]"),
    "experts id low": (edit("experts", _set((0, 0, 1), -1)), r"expert ids in \[0, 5\), found -1"),
    "experts repeat": (
        edit("experts", _set((2, 1), [3, 3])),
        r"expected 2 distinct experts per token and layer, found \[3, 3\] at token 2, layer 1",
    ),
    "weights shape": (
        edit("weights", lambda x: x[:-1]),
        r"weights: expected \[7, 3, 2\] like experts, found \[6, 3, 2\]",
    ),
    "weights nan": (edit("weights", _set((0, 0, 0), np.nan)), "weights: expected finite"),
    "weights int": (edit("weights", lambda x: x.astype(np.int8)), "weights: expected a floating-point array"),
    "starts not 0": (
        broken("seq_starts", np.array([1, 4, 7])),
        "seq_starts: expected to run from 0 to N = 7, found 1 to 7",
    ),
    "starts short": (broken("seq_starts", np.array([0, 4, 6])), "expected to run from 0 to N = 7, found 0 to 6"),
    "starts 2d": (
        broken("seq_starts", np.array([[0, 7]])),
        r"seq_starts: expected a 1-D array \[S \+ 1\], found shape \[1, 2\]",
    ),
    "starts empty seq": (
        broken("seq_starts", np.array([0, 4, 4, 7])),
        "strictly increasing offsets .* found 4 then 4 at sequence 1",
    ),
    "starts falling": (broken("seq_starts", np.array([0, 5, 4, 7])), "found 5 then 4 at sequence 1"),
    "phase value": (edit("phase", _set(3, 2)), r"phase: expected 0 \(prefill\) or 1 \(decode\), found \[2\]"),
    "phase shape": (edit("phase", lambda x: x[:-1]), r"phase: expected \[7\] \(one per token\), found \[6\]"),
    "prefill after decode": (
        edit("phase", _set(2, 0)),
        r"prefill tokens before its decode tokens, found prefill after decode at token 2 \(sequence 0\)",
    ),
    "lookahead shape": (edit("lookahead", lambda x: x[:, :2]), r"lookahead: expected \[7, 3, 2\] like experts"),
    "lookahead range": (
        edit("lookahead", _set((1, 0, 0), -1)),
        r"lookahead: expected expert ids in \[0, 5\), found -1",
    ),
    "lookahead last": (
        edit("lookahead", _set((1, 2, 0), 7)),
        r"lookahead \(last layer\): expected expert ids in \[-1, 5\)",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_every_validation_error_names_expected_and_found(case, tmp_path):
    a, message = INVALID[case]
    with pytest.raises(TraceFormatError, match=message):
        Trace(**a)
    path = save_raw(tmp_path / "bad.npz", **a)  # and the same through a file, prefixed by its path
    with pytest.raises(TraceFormatError, match=message) as info:
        read_trace(path)
    assert str(info.value).startswith(str(path))


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(TraceFormatError, match="expected an .npz trace archive"):
        read_trace(junk)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(TraceFormatError, match="found a single .npy array"):
        read_trace(single)
    a = arrays()
    del a["phase"]
    with pytest.raises(TraceFormatError, match="missing phase"):
        read_trace(save_raw(tmp_path / "missing.npz", **a))
    a = arrays()
    a["meta"] = np.array("{not json")
    with pytest.raises(TraceFormatError, match="meta: expected a JSON object, found text that is not JSON"):
        read_trace(save_raw(tmp_path / "meta.npz", **a))
    a["meta"] = np.zeros(2)
    with pytest.raises(TraceFormatError, match="meta: expected a JSON string, found a float64 array"):
        read_trace(save_raw(tmp_path / "meta2.npz", **a))
    good = save_raw(tmp_path / "cut.npz", **arrays())
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError):
        read_trace(good)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    write_trace(path, Trace(**arrays(seed=1)))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        write_trace(path, Trace(**arrays(seed=2)))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]


def add_token(builder, seq, experts, weights, phase, lookahead=None):
    """One token: experts, weights [L, K]; lookahead [L, K] or [L - 1, K]."""
    builder.add_tokens(seq, experts[None], weights[None], phase, None if lookahead is None else lookahead[None])


def test_builder_interleaves_sequences_and_orders_them_by_start():
    a = arrays(n_tokens=(3, 2))
    ex, w, la = a["experts"], a["weights"], a["lookahead"]
    b = TraceBuilder(L, E, K, model="toy", source="test")
    b.add_tokens("x", ex[0:1], w[0:1], 0, la[0:1])  # prefill of x
    add_token(b, "y", ex[3], w[3], 0, la[3, :-1])  # [L - 1, K] lookahead is padded
    add_token(b, "x", ex[1], w[1], 1, la[1])
    add_token(b, "y", ex[4], w[4], 1, la[4])
    add_token(b, "x", ex[2], w[2], 1, la[2])
    assert b.num_tokens == 5
    t = b.build()
    np.testing.assert_array_equal(t.experts, ex)
    np.testing.assert_array_equal(t.weights, w)
    np.testing.assert_array_equal(t.lookahead, la)
    np.testing.assert_array_equal(t.seq_starts, [0, 3, 5])
    np.testing.assert_array_equal(t.phase, [0, 1, 1, 0, 1])
    assert t.meta["sequences"] == ["x", "y"] and t.meta["model"] == "toy"


def test_builder_finish_reuses_keys_and_rejects_bad_tokens():
    a = arrays(n_tokens=(2, 2), lookahead=False)
    ex, w = a["experts"], a["weights"]
    b = TraceBuilder(L, E, K, model="toy", source="test", note="extra meta is kept")
    add_token(b, 0, ex[0], w[0], 1)
    b.finish(0)
    add_token(b, 0, ex[1], w[1], 1)
    t = b.build()
    assert t.num_sequences == 2 and t.lookahead is None and t.meta["note"] == "extra meta is kept"
    with pytest.raises(KeyError, match="expected an open sequence"):
        b.finish("never")
    with pytest.raises(TraceFormatError, match=r"experts: expected \[T, 3, 2\], found \[1, 2, 2\]"):
        add_token(b, 1, ex[0, :2], w[0, :2], 1)
    with pytest.raises(TraceFormatError, match="weights: expected"):
        add_token(b, 1, ex[0], w[0, :, :1], 1)
    with pytest.raises(TraceFormatError, match=r"expert ids in \[0, 5\), found 9"):
        add_token(b, 1, np.full((L, K), 9), w[0], 1)
    with pytest.raises(TraceFormatError, match="phase: expected 0"):
        add_token(b, 1, ex[0], w[0], 3)
    with pytest.raises(TraceFormatError, match="expected every token without it"):
        add_token(b, 1, ex[0], w[0], 1, ex[0])
    with pytest.raises(TraceFormatError, match="found prefill after decode"):
        add_token(b, 0, ex[2], w[2], 0)
    with pytest.raises(TraceFormatError, match="meta.source: expected a string, found None"):
        TraceBuilder(L, E, K, model="toy", source=None)


def test_builder_lookahead_shape_error():
    a = arrays(n_tokens=(1,))
    b = TraceBuilder(L, E, K, model="toy", source="test")
    with pytest.raises(TraceFormatError, match=r"lookahead: expected \[1, 3, 2\] or \[1, 2, 2\], found \[1, 1, 2\]"):
        add_token(b, 0, a["experts"][0], a["weights"][0], 1, a["lookahead"][0, :1])


def test_empty_builder_builds_an_empty_trace():
    t = TraceBuilder(L, E, K, model="toy", source="test").build()
    assert t.num_tokens == 0 and t.num_sequences == 0 and t.experts.shape == (0, L, K)
