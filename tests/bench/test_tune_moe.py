"""bench/tune_moe.py on the CPU: its smoke mode end to end (Triton interpreter, tiny shapes), the files it
writes as block_configs reads them, its candidate lists, and its selection, which never picks a
candidate whose output is wrong, however fast."""

import functools
import json
import math

import pytest
import torch

from bench import tune_moe
from moeinf.kernels import block_configs
from moeinf.kernels.block_configs import INTERPRETER_DEVICE, BlockConfig
from moeinf.kernels.moe import fused_moe
from moeinf.kernels.quant_moe import fused_quant_moe
from moeinf.kernels.quantize import QuantizedMatrix


def test_smoke_run_writes_a_file_block_configs_reads(tmp_path, capsys):
    argv = ["--smoke", "--models", "tiny", "--tokens", "1", "8", "--max-candidates", "3", "--out-dir", str(tmp_path)]
    assert tune_moe.main(argv) == 0
    D, F, E, K = tune_moe.SMOKE_MODELS["tiny"]
    path = tmp_path / block_configs.config_file_name(E, F, D, torch.float32, INTERPRETER_DEVICE)
    tuned, table = block_configs.read_config_file(path)
    assert tuned and sorted(table) == [1, 8]
    source = json.loads(path.read_text())["source"]
    assert "tune_moe" in source and "M=1: best" in source and "M=8: best" in source
    # the public lookup finds the file: the entry of the nearest M
    for m, expected_m in ((1, 1), (3, 1), (6, 8), (100, 8)):
        got = block_configs.moe_block_config(E, F, D, torch.float32, m, INTERPRETER_DEVICE, folder=tmp_path)
        assert got == table[expected_m]
    # every trial is in the CSV; each M's chosen config passed and is the one in the file
    rows = (tmp_path / f"tune_moe-{INTERPRETER_DEVICE}.csv").read_text().splitlines()
    header, rows = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert "status" in header and len(rows) == 2 * 3  # 2 M x 3 candidates, the budget being ample
    for m in (1, 8):
        chosen = [r for r in rows if r["M"] == str(m) and r["chosen"] == "1"]
        assert len(chosen) == 1 and chosen[0]["status"] == "ok"
        assert BlockConfig(*(int(chosen[0][n]) for n in tune_moe.GRID)) == table[m]
        assert sum(r["heuristic"] == "1" for r in rows if r["M"] == str(m)) == 1
    out = capsys.readouterr().out
    assert "speedup" in out and "wrote" in out


@pytest.mark.parametrize("format", ["int8", "int8g", "int4"])
def test_smoke_run_of_quantized_weights_writes_a_file_under_its_format(format, tmp_path):
    """--format: fused_quant_moe tuned on weights in that format, into a file whose name carries the
    format; the float lookup of the same shape does not see it, the quantized kernel's does."""
    argv = ["--smoke", "--models", "tiny", "--tokens", "1", "--max-candidates", "2", "--smoke-repeats", "1",
            "--format", format, "--out-dir", str(tmp_path)]  # fmt: skip
    assert tune_moe.main(argv) == 0
    D, F, E, K = tune_moe.SMOKE_MODELS["tiny"]
    name = block_configs.config_file_name(E, F, D, torch.float32, INTERPRETER_DEVICE, format=format)
    assert f",format={format}," in name
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [name]
    tuned, table = block_configs.read_config_file(tmp_path / name)
    assert tuned and sorted(table) == [1]
    lookup = functools.partial(block_configs.moe_block_config, E, F, D, torch.float32, 1, INTERPRETER_DEVICE)
    assert lookup(folder=tmp_path, format=format) == table[1]
    assert lookup(folder=tmp_path) == block_configs.heuristic_config(1, E, INTERPRETER_DEVICE)  # float: no file
    rows = (tmp_path / f"tune_moe-{INTERPRETER_DEVICE}-{format}.csv").read_text().splitlines()
    header = rows[0].split(",")
    rows = [dict(zip(header, r.split(","))) for r in rows[1:]]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {r["format"] for r in rows} == {"int8" if format == "int8" else f"{format}-g{tune_moe.SMOKE_GROUP_SIZE}"}
    assert "weights" in json.loads((tmp_path / name).read_text())["source"]


def test_quantized_candidates_are_checked_against_the_dequantized_reference():
    """A quantized kernel whose output is off (here: the float kernel on the weights' codes, unscaled)
    is rejected; fused_quant_moe itself passes."""
    kind = tune_moe.Weights("int4", 32)
    shape = tune_moe.SMOKE_MODELS["tiny"]
    D, F, E, K = shape
    w13, w2, slots = kind.experts(shape, torch.float32, torch.device("cpu"))
    x, ids, weights = tune_moe.make_tokens(4, D, E, K, torch.float32, torch.device("cpu"), seed=4)
    config = block_configs.heuristic_config(4, E, INTERPRETER_DEVICE)
    unscaled = QuantizedMatrix("int4", w2.q, torch.ones_like(w2.scale), w2.zero, w2.group_size)

    def wrong(x, ids, weights, w13, w2, slots, config):
        return fused_quant_moe(x, ids, weights, w13, unscaled, slots, config=config)

    for runner, status in ((kind.runner, "ok"), (wrong, "rejected")):
        (t,) = tune_moe.tune_case(
            (x, ids, weights, w13, w2, slots), [config], timer=lambda call: 1.0, tolerance=1e-4,
            deadline=math.inf, heuristic=config, runner=runner,
        )  # fmt: skip
        assert t.status == status, t.note
    assert tune_moe.Weights("int4", 64).unfit(shape) == "int4 groups of 64 need D = 64 and F = 32 multiples of it"
    mixtral = tune_moe.GPU_MODELS["Mixtral-8x7B"]
    assert "int4" in tune_moe.prune_reason(BlockConfig(16, 64, 128, 1), 1, mixtral, 2, group_size=32)  # runs as k32
    assert tune_moe.prune_reason(BlockConfig(16, 64, 128, 1), 1, mixtral, 2, group_size=128) is None
    with pytest.raises(ValueError, match="expected a group size with int8g and int4 only"):
        tune_moe.Weights("int8", 32)
    with pytest.raises(ValueError, match="expected a group size with int8g and int4 only"):
        tune_moe.Weights("int8g", None)


def trial(ms, error, block_m=16, status="ok"):
    return tune_moe.Trial(BlockConfig(block_m, 32, 32, 1), status=status, ms=ms, error=error)


def test_selection_never_picks_a_wrong_or_failed_candidate():
    tol = 1e-2
    trials = [
        trial(1.0, 1e-3, block_m=16),  # the heuristic
        trial(0.1, 0.5, block_m=32, status="rejected"),  # fastest, but wrong
        trial(None, None, block_m=64, status="failed"),  # did not compile
        trial(0.05, math.nan, block_m=128),  # NaN in its output
        trial(0.8, 2e-3, block_m=16),  # the fastest right one
        trial(0.8, 3e-3, block_m=32),  # as fast: the earlier one wins
        trial(0.01, tol * 1.01, block_m=64),  # just past the tolerance
    ]
    best = tune_moe.select_best(trials, tol)
    assert best is trials[4]
    assert tune_moe.select_best(trials[1:4], tol) is None


def test_a_wrong_candidate_is_rejected_before_it_is_timed():
    D, F, E, K = tune_moe.SMOKE_MODELS["tiny-odd"]
    w13, w2, slots = tune_moe.make_experts(D, F, E, torch.float32, torch.device("cpu"))
    x, ids, weights = tune_moe.make_tokens(5, D, E, K, torch.float32, torch.device("cpu"), seed=5)
    heuristic = block_configs.heuristic_config(5, E, INTERPRETER_DEVICE)
    wrong, broken, right = (BlockConfig(16, 32, 32, 1), BlockConfig(32, 32, 32, 1), BlockConfig(16, 64, 32, 1))

    def runner(*args, config):
        if config == broken:
            raise RuntimeError("out of resources: shared memory")
        out = fused_moe(*args, config=config)
        return out * 1.01 if config == wrong else out  # a 1% error: wrong for float32

    timed = []

    def timer(call):
        timed.append(call.keywords["config"])
        return 0.001 if call.keywords["config"] == wrong else 1.0  # the wrong one would be fastest

    trials = tune_moe.tune_case(
        (x, ids, weights, w13, w2, slots), [heuristic, wrong, broken, right], timer=timer, tolerance=1e-4,
        deadline=math.inf, heuristic=heuristic, runner=runner,
    )  # fmt: skip
    status = {t.config: t.status for t in trials}
    assert status == {heuristic: "ok", wrong: "rejected", broken: "failed", right: "ok"}
    assert timed == [heuristic, right] and trials[0].heuristic and not trials[3].heuristic
    assert "out of resources" in trials[2].note and trials[1].error > 5e-3
    assert tune_moe.select_best(trials, 1e-4).config in (heuristic, right)


def test_deadline_stops_after_the_heuristic():
    D, F, E, K = tune_moe.SMOKE_MODELS["tiny"]
    w13, w2, slots = tune_moe.make_experts(D, F, E, torch.float32, torch.device("cpu"))
    x, ids, weights = tune_moe.make_tokens(3, D, E, K, torch.float32, torch.device("cpu"), seed=3)
    heuristic = block_configs.heuristic_config(3, E, INTERPRETER_DEVICE)
    trials = tune_moe.tune_case(
        (x, ids, weights, w13, w2, slots), [heuristic, BlockConfig(16, 32, 32, 1)], timer=lambda call: 1.0,
        tolerance=1e-4, deadline=0.0, heuristic=heuristic,
    )  # fmt: skip
    assert [t.config for t in trials] == [heuristic]  # the baseline runs whatever the time


@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("model", ["Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V2-Lite"])
def test_candidates_heuristic_first_pruned_and_capped(model, M):
    shape = tune_moe.GPU_MODELS[model]
    heuristic = block_configs.heuristic_config(M, shape[2], "NVIDIA_H200")
    plan = tune_moe.plan_candidates(M, shape, 2, heuristic, 10)
    assert plan.first[0] == heuristic and len(plan.first) == len(set(plan.first)) <= 10
    assert plan.grid == 4 * 3 * 3 * 2 * 2 * 3 and 0 < len(plan.kept) < plan.grid
    assert all(tune_moe.prune_reason(c, M, shape, 2) is None for c in plan.first[1:])
    # the first round holds one launch per tile; the second, launch variants of the fastest tiles
    assert len({tune_moe.tile(c) for c in plan.first}) == len(plan.first)
    trials = [tune_moe.Trial(c, status="ok", ms=float(i + 1), error=0.0) for i, c in enumerate(plan.first)]
    variants = tune_moe.second_round(trials, plan.kept, 1e-2, 6)
    assert len(variants) <= 6 and not set(variants) & set(plan.first)
    assert {tune_moe.tile(c) for c in variants} <= {tune_moe.tile(plan.first[0]), tune_moe.tile(plan.first[1])}


def test_pruning_rules():
    mixtral = tune_moe.GPU_MODELS["Mixtral-8x7B"]
    assert "shared memory" in tune_moe.prune_reason(BlockConfig(128, 128, 128, 8, 8, 4), 4096, mixtral, 2)
    assert "registers" in tune_moe.prune_reason(BlockConfig(128, 128, 64, 8, 4, 2), 4096, mixtral, 2)
    assert "block_m" in tune_moe.prune_reason(BlockConfig(128, 64, 64, 1), 1, mixtral, 2)  # decode: 1 pair per expert
    assert "group_m" in tune_moe.prune_reason(BlockConfig(16, 64, 64, 8), 1, mixtral, 2)
    assert tune_moe.prune_reason(BlockConfig(64, 128, 64, 8, 4, 3), 4096, mixtral, 2) is None


def test_dry_run_list_needs_no_gpu(capsys):
    assert tune_moe.main(["--dry-run-list", "--models", "Qwen3-30B-A3B", "--tokens", "1", "4096"]) == 0
    out = capsys.readouterr().out
    assert out.count("heuristic") == 2 and "M=4096" in out


def test_write_config_file_is_atomic_and_seen_by_later_lookups(tmp_path):
    args = (8, 64, 32, torch.bfloat16, "Some_GPU")
    before = block_configs.moe_block_config(*args[:4], 16, "Some_GPU", folder=tmp_path)
    assert before == block_configs.heuristic_config(16, 8, "Some_GPU")  # no file yet (and that is cached)
    config = BlockConfig(32, 64, 128, 1, 8, 4)
    path = block_configs.write_config_file(tmp_path, *args, {16: config, 1: BlockConfig(16, 32, 64, 1)}, "test")
    assert path.name == block_configs.config_file_name(*args)
    assert block_configs.moe_block_config(*args[:4], 16, "Some_GPU", folder=tmp_path) == config
    assert list(json.loads(path.read_text())["configs"]) == ["1", "16"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left beside it
    with pytest.raises(ValueError, match="at least one"):
        block_configs.write_config_file(tmp_path, *args, {}, "test")
    with pytest.raises(ValueError, match="BlockConfig"):
        block_configs.write_config_file(tmp_path, *args, {0: config}, "test")
