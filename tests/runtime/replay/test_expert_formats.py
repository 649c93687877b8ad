"""Expert formats in the replay's cost model: a model's routed experts stored as int8 / int4 cost the
bytes of loaders/expert_record.py's records, at the same FLOPs; replay, bench/policy.py's --expert-format
and the report's own policy.md section."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bench import placements
from bench.policy import main as policy_main
from bench.policy import report_sources
from moeinf.errors import ReplayConfigError
from moeinf.runtime.replay.cost import (
    EXPERT_FORMAT_CHOICES,
    EXPERT_FORMATS,
    MODELS,
    RECORD_FIELD_ALIGN,
    ModelCost,
    profile_for,
)
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.traces import write_trace
from tests.paths import ROOT
from tests.runtime.replay.test_replay import make_trace, random_trace

SHAPES = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768), "deepseek-v3": (7168, 2048)}  # (D, F)
QUANTIZED = tuple(EXPERT_FORMATS)  # int8, int4, int4-g64, int4-g128


def record_payload(hidden_size: int, expert_ffn: int, name: str) -> int:
    """The payload bytes of one expert's record in format `name`, as the loaders lay it out."""
    torch = pytest.importorskip("torch")
    from moeinf.loaders.expert_format import resolve_expert_format
    from moeinf.loaders.expert_record import RecordLayout

    fmt = resolve_expert_format(name, torch.bfloat16)
    return RecordLayout.for_format(hidden_size, expert_ffn, fmt).payload_nbytes


def mixtral_trace(seed: int = 1, sequences: int = 2, tokens: int = 3):
    trace = random_trace(np.random.default_rng(seed), 32, 8, 2, sequences=sequences, tokens=tokens)
    trace.meta["model"] = "Mixtral-8x7B (random routing)"
    return trace


# ---------------------------------------------------------------------------------- bytes and FLOPs


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("model", list(SHAPES))
def test_a_formats_expert_bytes_are_its_records_at_the_real_shapes(model, name):
    native = MODELS[model]
    D, F = SHAPES[model]
    assert (native.hidden_size, native.expert_ffn) == (D, F)
    assert native.expert_params == 3 * D * F
    quantized = native.with_expert_format(name)
    assert quantized.expert_bytes == record_payload(D, F, name)
    assert quantized.expert_format == name and quantized.name == native.name


def test_the_native_bytes_are_the_float_records_and_the_layout_constants_agree():
    torch = pytest.importorskip("torch")
    from moeinf.loaders.expert_format import EXPERT_DTYPE_CHOICES
    from moeinf.loaders.expert_record import FIELD_ALIGN, RecordLayout

    for model in ("mixtral-8x7b", "qwen3-30b-a3b"):  # bf16 experts (DeepSeek-V3's FP8 has no float record)
        D, F = SHAPES[model]
        assert MODELS[model].expert_bytes == RecordLayout.of(D, F, torch.bfloat16).payload_nbytes
        assert MODELS[model].with_expert_format("native") is MODELS[model]
    assert RECORD_FIELD_ALIGN == FIELD_ALIGN
    assert set(QUANTIZED) <= set(EXPERT_DTYPE_CHOICES) and EXPERT_FORMAT_CHOICES == ("native", *QUANTIZED)


@pytest.mark.parametrize(
    ("D", "F", "name"), [(36, 20, "int8"), (100, 44, "int8"), (96, 160, "int4"), (192, 64, "int4-g64")]
)
def test_the_field_alignment_padding_is_counted_at_odd_shapes(D, F, name):
    model = ModelCost("odd", 1, 2, 1, 3 * D * F * 2, 1, 1, 2, hidden_size=D, expert_ffn=F)
    assert model.with_expert_format(name).expert_bytes == record_payload(D, F, name)


def test_int4_groups_must_divide_the_inputs():
    model = ModelCost("odd", 1, 2, 1, 3 * 128 * 80 * 2, 1, 1, 2, hidden_size=128, expert_ffn=80)
    with pytest.raises(ReplayConfigError, match="int4-g64: expected the group size 64 to divide a matrix's 80 inputs"):
        model.with_expert_format("int4-g64")


@pytest.mark.parametrize("model", list(SHAPES))
def test_the_format_changes_bytes_not_flops(model):
    m = MODELS[model]
    trace = make_trace(np.zeros((1, m.num_layers, m.top_k), int) + np.arange(m.top_k), m.num_experts, model=model)
    native = profile_for(trace, "pcie4", host="ddr4")
    int4 = profile_for(trace, "pcie4", host="ddr4", expert_format="int4")
    ratio = int4.model.expert_bytes / native.model.expert_bytes
    assert int4.model.expert_params == native.model.expert_params
    assert int4.expert_costs().flops_per_token == native.expert_costs().flops_per_token
    assert int4.model.expert_bytes_per_param == pytest.approx(0.5625)  # 0.5 + 2 / 32
    assert int4.layer_s(1, 2)[0] == native.layer_s(1, 2)[0] and int4.step_s() == native.step_s()  # dense as it was
    # bandwidth-bound (a decode token): every reader of the weights scales with the bytes
    assert int4.load_s == pytest.approx(native.load_s * ratio)
    assert int4.host_expert_s(1) == pytest.approx(native.host_expert_s(1) * ratio)
    assert int4.device_experts_s(1, 1) == pytest.approx(native.device_experts_s(1, 1) * ratio)
    # compute-bound (a long prefill): the same FLOPs take the same time
    assert int4.host_expert_s(100_000) == native.host_expert_s(100_000)
    assert int4.device_experts_s(1_000_000, 1) == native.device_experts_s(1_000_000, 1)


def test_a_traced_model_without_its_shapes_converts_by_the_params_ratio_and_with_them_exactly():
    D, F = 4096, 14336
    cost = dict(expert_bytes=3 * D * F * 2, layer_dense_bytes=10_000_000, step_bytes=50_000_000, bytes_per_param=2)
    trace = make_trace(np.zeros((1, 4, 2), int) + [0, 1], 8, model="my-model")
    trace.meta["cost"] = cost
    ratio = profile_for(trace, expert_format="int4").model
    assert ratio.expert_bytes == math.ceil(3 * D * F * (0.5 + 2 / 32)) == record_payload(D, F, "int4")
    assert profile_for(trace, expert_format="int8").model.expert_bytes == 3 * D * F  # int8's row scales left out
    trace.meta["cost"] = dict(cost, hidden_size=D, expert_ffn=F)
    exact = profile_for(trace, expert_format="int8").model
    assert exact.expert_bytes == record_payload(D, F, "int8") and exact.expert_params == 3 * D * F
    trace.meta["cost"] = dict(cost, hidden_size=D)
    with pytest.raises(ReplayConfigError, match=r"\(and optionally both of hidden_size, expert_ffn\)"):
        profile_for(trace)
    trace.meta["cost"] = dict(cost, hidden_size=D, expert_ffn=14336.5)
    with pytest.raises(ReplayConfigError, match="meta.cost.expert_ffn: expected a whole number of elements"):
        profile_for(trace)


def test_bad_format_names_are_refused():
    mixtral = mixtral_trace()
    with pytest.raises(ReplayConfigError, match="expert format: expected one of native, int8, int4, int4-g64, "
                       "int4-g128, found 'int3'"):  # fmt: skip
        profile_for(mixtral, expert_format="int3")
    with pytest.raises(ReplayConfigError, match="found 'bfloat16'"):
        MODELS["mixtral-8x7b"].with_expert_format("bfloat16")  # the native one is called native
    with pytest.raises(ReplayConfigError, match="expected the model's native costs to convert, found them in 'int4'"):
        MODELS["mixtral-8x7b"].with_expert_format("int4").with_expert_format("int8")


# ---------------------------------------------------------------------------------- replay


def test_int4_experts_cut_tpot_on_a_link_bound_replay():
    trace = mixtral_trace(seed=3, sequences=2, tokens=4)
    native = replay(trace, "lru", 16, profile_for(trace, "pcie4"))
    int4 = replay(trace, "lru", 16, profile_for(trace, "pcie4", expert_format="int4"))
    assert (int4.misses, int4.hit_rate) == (native.misses, native.hit_rate)  # the same decisions
    bytes_ratio = MODELS["mixtral-8x7b"].with_expert_format("int4").expert_bytes / MODELS["mixtral-8x7b"].expert_bytes
    assert int4.bytes == pytest.approx(native.bytes * bytes_ratio)
    # link-bound: TPOT falls nearly with the bytes (compute, 4 ms of a native 100+ ms, does not)
    assert native.stall_s > 0.9 * native.total_s
    assert bytes_ratio < int4.tpot_s / native.tpot_s < bytes_ratio + 0.05


# ---------------------------------------------------------------------------------- bench/policy.py


def test_policy_bench_json_with_an_expert_format_keeps_its_schema_and_uses_the_formats_costs(tmp_path):
    trace = mixtral_trace(seed=2)
    write_trace(tmp_path / "t.npz", trace)
    command = [sys.executable, "-m", "bench.policy", "--trace", str(tmp_path / "t.npz"), "--capacity", "0.25",
               "--profile", "pcie4", "--host", "ddr4", "--expert-format", "int4", "--json"]  # fmt: skip
    figures = json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert set(figures) == {"policies", "bound", "default"} and figures["default"] == placements.DEFAULT
    for summary in figures["policies"].values():
        assert set(summary) == {"hit_rate", "misses", "bytes", "stall_s", "tpot_s"}
    int4 = profile_for(trace, "pcie4", expert_format="int4")
    assert figures["policies"]["lru"]["tpot_s"] == pytest.approx(replay(trace, "lru", 64, int4).tpot_s)
    assert figures["policies"]["lru"]["bytes"] == figures["policies"]["lru"]["misses"] * int4.model.expert_bytes
    default = placements.run_configuration(trace, placements.DEFAULT, 64, "pcie4", placements.HOSTS["ddr4"])
    assert figures["policies"][placements.DEFAULT]["tpot_s"] < default["tpot_s"]  # the native default's


def test_policy_bench_refuses_bad_formats_and_format_reports_without_a_host(capsys):
    with pytest.raises(SystemExit) as exit_:
        policy_main(["--trace", "t.npz", "--expert-format", "int3"])
    assert exit_.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        policy_main(["--report", "--expert-format", "int4"])
    assert exit_.value.code == 2 and "expected --report --host" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--workloads: expected substrings of the workload names"):
        report_sources(["no-such-workload"])


def hybrid_results(fmt: str, tpot_s: dict[str, float]) -> dict:
    """A placements.report results dict of one workload, capacity and host: configuration -> TPOT."""
    configs = {n: {"tpot_s": t, "hit_rate": 0.5, "bytes": 0} for n, t in tpot_s.items()}
    results = {
        "written": "2026-01-01T00:00:00+00:00",
        "command": f"python -m bench.policy --report --host ddr4 --expert-format {fmt}",
        "link": "pcie4",
        "default": placements.DEFAULT,
        "expert_format": fmt,
        "hosts": {"ddr4": vars(placements.HOSTS["ddr4"])},
        "expert_mb": {"w": 99.1},
        "model_cost": {"w": "mixtral-8x7b"},
        "workloads": {"w": {"0.25": {"ddr4": configs}}},
    }
    return results


def test_a_format_report_writes_its_own_section_and_leaves_the_rest_byte_for_byte(tmp_path):
    path = tmp_path / "policy.md"
    native = hybrid_results("native", {"lru": 0.9, placements.DEFAULT: 0.2})
    del native["expert_format"]  # policy-hybrid.json as written before formats existed
    path.write_text("# Policy replay\n\nprose\n")
    placements.write_tables(native, path)
    before = path.read_text()
    int4 = hybrid_results("int4", {"lru": 0.3, "lru+host": 0.04, placements.DEFAULT: 0.05})
    int4["vs_native"] = placements.versus_native(int4, native, {"w": "bf16"})
    placements.write_tables(int4, path)
    text = path.read_text()
    begin, end, heading = placements.markers("int4")
    assert text.startswith(before) and text[len(before) :].startswith(f"\n{heading}\n\n{begin}")
    assert text.endswith(f"{end}\n") and placements.BEGIN not in text[len(before) :]
    cell = int4["vs_native"]["cells"][0]
    assert (cell["native_tpot_s"], cell["ratio"], cell["fastest"]) == (0.2, pytest.approx(0.25), "lru+host")
    assert "| w | 25.0% | ddr4 | 200.0 (bf16) | 50.0 | 0.25x | lru+host (0.80x the default's TPOT) |" in text
    assert "in 0 of 1 cells; closest: lru+host at 0.8000x the default's TPOT (w, 25.0%, ddr4)." in text
    # rewriting replaces only its own section; rewriting the native one leaves the int4 one
    int4["written"] = "2026-02-02T00:00:00+00:00"
    placements.write_tables(int4, path)
    placements.write_tables(native, path)
    again = path.read_text()
    assert again.startswith(before) and "Written 2026-02-02" in again and again.count(heading) == 1
    # a native report on another link has no cell to compare with
    other = dict(native, link="pcie5")
    assert placements.versus_native(int4, other, {"w": "bf16"})["cells"][0]["ratio"] is None
