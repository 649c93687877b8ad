"""bench/host_experts.py end to end on a tiny working set: its --json rows (float and quantized) and
its results file."""

import json

from bench import host_experts


def test_json_rows_and_results_file(tmp_path, capsys):
    argv = ["--shapes", "default", "--tokens", "1,4", "--dtypes", "float32,bfloat16,int8,int4", "--repeats", "1"]
    assert host_experts.main(argv + ["--working-set-mb", "1", "--json", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["shape"], r["tokens"], r["dtype"]) for r in rows] == [
        ("default 512x1792", t, d) for d in ("float32", "bfloat16", "int8", "int4") for t in (1, 4)
    ]
    assert all(r["gbps"] > 0 and r["stream_gbps"] > 0 and r["torch_gbps"] > 0 for r in rows)
    saved = json.loads((tmp_path / "host-experts-cpu.json").read_text())
    assert saved["machine"]["cpu_count"] >= 1 and len(saved["rows"]) == 8
    assert all(r["max_abs_diff_vs_torch"] < 0.05 for r in saved["rows"])
    # the quantized rows count quantized bytes: int8 about a quarter of float32's, int4 an eighth (plus scales)
    expert_mb = {r["dtype"]: r["expert_mb"] for r in saved["rows"]}
    assert expert_mb["int8"] < 0.26 * expert_mb["float32"] and expert_mb["int4"] < 0.15 * expert_mb["float32"]
    assert all(r["max_abs_diff_vs_torch"] < 1e-4 for r in saved["rows"] if r["dtype"] in ("int8", "int4"))
