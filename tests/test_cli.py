"""`moeinf run` end to end, on the built-in default model and on a given checkpoint."""

import json

from moeinf.cli import main
from moeinf.loaders.checkpoint import Checkpoint
from moeinf.loaders.default_model import DEFAULT_CONFIG, DEFAULT_MODEL_NAME, cache_dir, ensure_default_model


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
    assert checkpoint.expert_bytes() / total > 0.9


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
