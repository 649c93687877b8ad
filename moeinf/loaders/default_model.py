"""The built-in default model: a small Mixtral-architecture checkpoint with seeded random weights.

It is written once into the user's cache directory in the exact Hugging Face layout
(config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json),
so every code path that serves a real checkpoint serves it too. Experts are ~98% of its bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from moeinf.atomic_write import write_text_atomic
from moeinf.errors import CacheDirError
from moeinf.models.family import ROLE_SHAPES
from moeinf.models.mixtral import MIXTRAL_TENSOR_NAMES, parse_mixtral_config

DEFAULT_MODEL_NAME = "default-mixtral-v1"
# a small chat template, so that chat completions work out of the box: each turn a "<|role|>" line
# and its text, the assistant's turn opened last (the text is noise: the weights are random)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "chat_template": CHAT_TEMPLATE,
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; the 256 byte tokens follow
DEFAULT_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": len(SPECIAL_TOKENS) + 256,
    "hidden_size": 512,
    "intermediate_size": 1792,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_window": None,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "bfloat16",
    "initializer_range": 0.02,
}
SEED = 20240123


def cache_dir() -> Path:
    """$MOEINF_CACHE_DIR, else $XDG_CACHE_HOME/moeinf, else ~/.cache/moeinf, created if missing
    (its callers are about to use it). CacheDirError when it is a file, lies under one, or cannot
    be created."""
    if os.environ.get("MOEINF_CACHE_DIR"):
        folder, source = Path(os.environ["MOEINF_CACHE_DIR"]).expanduser(), "MOEINF_CACHE_DIR"
    elif os.environ.get("XDG_CACHE_HOME"):
        folder, source = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moeinf", "$XDG_CACHE_HOME/moeinf"
    else:
        folder, source = Path.home() / ".cache" / "moeinf", "~/.cache/moeinf"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # FileExistsError: a file of that name; NotADirectoryError: under a file
        what = "a file" if folder.is_file() else e.strerror or str(e)
        raise CacheDirError(
            f"{source}: expected the cache directory to be a folder moeinf can create or use, found {folder} ({what})"
        ) from None
    return folder


def build_byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: every byte is a token, so any text round-trips."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def write_checkpoint(folder: Path, config: dict, seed: int, progress: bool) -> None:
    """Writes a random Mixtral checkpoint with `config` into `folder` (which must exist)."""
    spec = parse_mixtral_config(config)
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, config["dtype"])
    std = config["initializer_range"]

    def random(role: str) -> torch.Tensor:
        shape = tuple(getattr(spec, dim) for dim in ROLE_SHAPES[role])
        if role.endswith("norm"):
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * std).to(dtype)

    tensors = {MIXTRAL_TENSOR_NAMES[r]: random(r) for r in ("embed", "final_norm", "lm_head")}
    for layer in tqdm(range(spec.num_layers), desc="building default model", unit="layer", disable=not progress):
        for role in ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "ffn_norm", "router"):
            tensors[MIXTRAL_TENSOR_NAMES[role].format(layer=layer)] = random(role)
        for expert in range(spec.num_experts):
            for role in ("expert_gate", "expert_up", "expert_down"):
                tensors[MIXTRAL_TENSOR_NAMES[role].format(layer=layer, expert=expert)] = random(role)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    build_byte_tokenizer().save(str(folder / "tokenizer.json"))
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(TOKENIZER_CONFIG, indent=2))


def _add_chat_template(folder: Path) -> None:
    """Models built before the chat template shipped gain it (the weights are unchanged)."""
    path = folder / "tokenizer_config.json"
    if json.loads(path.read_text()).get("chat_template") != CHAT_TEMPLATE:
        write_text_atomic(path, json.dumps(TOKENIZER_CONFIG, indent=2))


def ensure_default_model(progress: bool = True) -> Path:
    """Path of the default model, building it on first use.

    It is built in a temporary folder beside its final place and renamed in one step, so an
    interrupted build never leaves a half-written model that a later run would trust.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        _add_chat_template(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        write_checkpoint(staging, DEFAULT_CONFIG, SEED, progress)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
