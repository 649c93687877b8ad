"""`moeinf run` end to end, on the built-in default model and on a given checkpoint."""

import importlib.metadata
import json

import numpy as np
import pytest

from moeinf.cli import DEFAULT_PROMPT, main
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.default_model import DEFAULT_CONFIG, DEFAULT_MODEL_NAME, cache_dir, ensure_default_model
from moeinf.loaders.expert_format import ExpertFormat
from moeinf.loaders.expert_record import RecordLayout


def test_run_builds_the_default_model_once_and_prints_text_and_speed(capsys):
    assert main(["run", "--max-new-tokens", "4", "--prompt", "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello")
    assert "tokens/s" in out and "peak memory" in out
    folder = ensure_default_model(progress=False)
    assert folder == cache_dir() / DEFAULT_MODEL_NAME
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in cache_dir().iterdir() if p.name.startswith(".")]  # no staging folder left
    checkpoint = Checkpoint.open(folder)
    assert json.loads((folder / "config.json").read_text()) == DEFAULT_CONFIG
    # the default model exists to exercise offloading: experts must be most of its bytes
    total = sum(info.nbytes for info in checkpoint.index.infos.values())
    spec, family = checkpoint.spec, checkpoint.family
    names = [name for layer in spec.moe_layers for name in family.expert_tensor_names(spec, layer)]
    assert sum(checkpoint.index.info(name).nbytes for name in names) / total > 0.9


def test_run_on_a_checkpoint_with_sampling(tiny_mixtral, capsys, tmp_path):
    folder, _ = tiny_mixtral
    args = ["run", "--model", str(folder), "--prompt-ids", "5,6,7", "--max-new-tokens", "3"]
    args += ["--temperature", "0.8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out.split("---")[0]
    assert "prompt ids: [5, 6, 7]" in first
    assert main(args) == 0
    assert capsys.readouterr().out.split("---")[0] == first


def test_run_reports_a_bad_model_folder_as_a_named_error(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path / "nowhere")]) == 2
    assert "ConfigError" in capsys.readouterr().err


def test_run_without_tokenizer_asks_for_token_ids(tiny_mixtral, capsys):
    folder, _ = tiny_mixtral
    assert main(["run", "--model", str(folder), "--prompt", "text"]) == 2
    assert "pass prompts as token id lists" in capsys.readouterr().err
    assert main(["run", "--model", str(folder), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated token ids" in capsys.readouterr().err


def test_run_with_an_expert_budget_offloads_and_reports_traffic(tiny_mixtral, capsys, tmp_path):
    folder, _ = tiny_mixtral
    base = ["run", "--model", str(folder), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6"]
    assert main(base) == 0
    resident = capsys.readouterr().out.split("---")[0]
    assert main(base + ["--budget", "0.5", "--offload-dir", str(tmp_path), "--policy", "lfu"]) == 0
    out = capsys.readouterr().out
    assert out.split("---")[0] == resident  # same tokens
    assert "4 resident" in out and "MiB from disk" in out  # 2 layers x 4 experts, half of them
    assert main(base + ["--budget", "1"]) == 2  # one slot: below one layer's 4 experts
    assert "the minimum is 4" in capsys.readouterr().err


def test_run_with_int4_experts_offloaded_gives_the_resident_tokens(tiny_mixtral, capsys, tmp_path):
    folder, _ = tiny_mixtral
    base = ["run", "--model", str(folder), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--expert-dtype", "int4"]
    assert main(base) == 0
    resident = capsys.readouterr().out
    assert "experts int4-g32" in resident
    assert main(base + ["--budget", "0.5", "--offload-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split("---")[0] == resident.split("---")[0]
    assert (tmp_path / "experts-int4-g32.moeinf").is_file()
    with pytest.raises(SystemExit):  # argparse names the choices
        main(base[:-1] + ["int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_trace_records_every_token_of_every_prompt(tmp_path, capsys):
    from moeinf.loaders.default_model import build_byte_tokenizer
    from moeinf.runtime.replay.cost import profile_for
    from moeinf.runtime.replay.loop import replay
    from moeinf.runtime.traces import read_trace
    from tests.checkpoints import save_tiny_mixtral

    folder = tmp_path / "model"
    save_tiny_mixtral(folder, seed=4, vocab_size=259, bos_token_id=1, eos_token_id=2)
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "first one"}\n{"prompt": "a second, longer prompt"}\n{"prompt": "x"}\n')
    out = tmp_path / "trace.npz"
    args = ["trace", "--model", str(folder), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4"]
    assert main(args + ["--batch-size", "2"]) == 0
    trace = read_trace(out)
    # prompt tokens (with <s>) are prefill; the 4 generated tokens but the last are decode
    prompt_lengths = [1 + len(p) for p in ("first one", "a second, longer prompt", "x")]
    lengths = [length + 3 for length in prompt_lengths]
    assert trace.seq_starts.tolist() == [0] + list(np.cumsum(lengths))
    assert trace.phase.tolist() == sum(([0] * p + [1] * 3 for p in prompt_lengths), [])
    assert trace.experts.shape == (sum(lengths), 2, 2) and trace.lookahead is not None
    assert (trace.lookahead[:, -1] == -1).all() and (trace.lookahead[:, 0] >= 0).all()
    assert np.allclose(trace.weights.astype(np.float32).sum(-1), 1.0, atol=1e-2)  # Mixtral renormalises
    # recorded routing is the routing the runtime used: batch size does not change it
    assert main(args + ["--batch-size", "1", "--out", str(tmp_path / "one.npz")]) == 0
    assert np.array_equal(read_trace(tmp_path / "one.npz").experts, trace.experts)
    # the trace carries its model's costs, so replay times it without a known profile
    D, F, V = 64, 96, 259  # the tiny Mixtral, saved in float32
    attention = D * D + 2 * D * 32 + D * D  # q, k, v (2 KV heads of 16), o
    assert trace.meta["cost"] == {
        "expert_bytes": 3 * D * F * 4,
        "layer_dense_bytes": (attention + 2 * D + 4 * D) * 4,  # + two norms + the router of 4 experts
        "step_bytes": (D + V * D) * 4,  # final norm and lm head
        "bytes_per_param": 4,
        "hidden_size": D,
        "expert_ffn": F,
    }
    assert profile_for(trace).model.name == "model" and profile_for(trace).load_s == 3 * D * F * 4 / 25e9
    # its shape makes another format's bytes exact: those of the int8 record
    int8 = profile_for(trace, expert_format="int8").model
    assert int8.expert_bytes == RecordLayout.for_format(D, F, ExpertFormat("int8")).payload_nbytes
    assert replay(trace, "activation-aware", 4, "pcie4").tpot_s > 0


def test_trace_rejects_a_malformed_prompts_file(tiny_mixtral, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    args = ["trace", "--model", str(tiny_mixtral[0]), "--prompts", str(bad), "--out", str(tmp_path / "t.npz")]
    assert main(args) == 2
    assert 'bad.jsonl:2: expected a JSON object with a "prompt" string' in capsys.readouterr().err


def test_run_on_an_unknown_device_is_a_named_error(tiny_mixtral, capsys):
    assert main(["run", "--model", str(tiny_mixtral[0]), "--prompt-ids", "1,2", "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeinf: error: RequestError: expected device 'cpu' or 'cuda'") and "'tpu'" in err


def test_run_with_a_seed_beyond_the_generator_is_a_named_error(tiny_mixtral, capsys):
    args = ["run", "--model", str(tiny_mixtral[0]), "--prompt-ids", "1,2", "--temperature", "1"]
    assert main(args + ["--seed", "99999999999999999999999"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("moeinf: error: RequestError: SamplingParams: expected seed")
        and "99999999999999999999999" in err
    )


def test_run_with_an_offload_dir_that_is_a_file_is_a_named_error(tiny_mixtral, capsys, tmp_path):
    a_file = tmp_path / "store"
    a_file.write_text("mine")
    args = ["run", "--model", str(tiny_mixtral[0]), "--prompt-ids", "1,2", "--budget", "0.5"]
    assert main(args + ["--offload-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeinf: error: OffloadConfigError: expert store folder (offload_dir): expected a folder")
    assert a_file.read_text() == "mine"


def test_run_with_a_cache_dir_that_is_a_file_is_a_named_error(capsys, tmp_path, monkeypatch):
    a_file = tmp_path / "cache"
    a_file.write_text("mine")
    monkeypatch.setenv("MOEINF_CACHE_DIR", str(a_file))
    assert main(["run", "--max-new-tokens", "1"]) == 2  # the default model lives in the cache dir
    assert capsys.readouterr().err.startswith("moeinf: error: CacheDirError: MOEINF_CACHE_DIR")
    assert a_file.read_text() == "mine"


def test_run_prints_the_prompt_ids_it_was_given(tmp_path, capsys):
    from moeinf.loaders.default_model import build_byte_tokenizer
    from moeinf.loaders.tokenizer import TextCodec
    from tests.checkpoints import save_tiny_mixtral

    folder = tmp_path / "model"
    save_tiny_mixtral(folder, seed=4, vocab_size=259, bos_token_id=1, eos_token_id=2)
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    assert main(["run", "--model", str(folder), "--prompt-ids", "1,72,101", "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out.split("---")[0]
    given = TextCodec(folder / "tokenizer.json").decode([1, 72, 101])
    assert given and text.startswith(given) and DEFAULT_PROMPT not in text


def test_run_summary_names_every_traffic_counter_that_is_not_zero():
    from moeinf.cli import traffic_summary
    from moeinf.runtime.cache.counters import COUNTERS

    stats = {name: 0 for name in COUNTERS} | {"resident_experts": 4}
    assert traffic_summary(stats) == "experts: 4 resident"
    every = {name: 3 for name in COUNTERS} | {"resident_experts": 4, "bytes_from_disk": 3 * 2**20}
    line = traffic_summary(every)
    for name in COUNTERS:
        label = name.removeprefix("bytes_").removesuffix("_s").replace("_", " ")
        assert label in line, name
    assert "3.0 MiB from disk" in line and "3 prefetch wasted" in line and "3 checksum failures" in line


def test_run_with_an_expert_budget_reports_evictions(tiny_mixtral, capsys, tmp_path):
    args = ["run", "--model", str(tiny_mixtral[0]), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6"]
    assert main(args + ["--budget", "0.5", "--offload-dir", str(tmp_path), "--policy", "lfu"]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("experts:"))
    assert " evictions" in summary and " misses" in summary


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moeinf {importlib.metadata.version('moeinf')}"
