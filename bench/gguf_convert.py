"""Converts a Mixtral-architecture Hugging Face checkpoint to GGUF, for the llama.cpp baseline.

Run (in the llama.cpp benchmark's own environment, see bench/llamacpp.py, which calls it):
    python -m bench.gguf_convert CHECKPOINT_DIR OUT.gguf --type f32|bf16|q8_0|q8_0-experts|q4_0-experts

Written from the GGUF format's documentation (ggml's docs/gguf.md) and the `gguf` package's
writer; llama.cpp runs a Mixtral as its "llama" architecture with expert tensors. What it takes:
  - metadata under "llama.*": context/embedding/feed-forward lengths, block count, head counts,
    rope base and dimension count, the RMSNorm epsilon, expert count and experts used per token;
  - the tokenizer: tokenizer.json's vocabulary in id order (see add_tokenizer), so that token ids
    mean the same in both engines;
  - tensors by GGUF name. Shapes below are numpy's (row-major, the reverse of ggml's `ne`):
      token_embd.weight [V, D]         output.weight [V, D]        output_norm.weight [D]
      blk.N.attn_norm.weight [D]       blk.N.ffn_norm.weight [D]
      blk.N.attn_q.weight [H*Dh, D]    blk.N.attn_k.weight [Hkv*Dh, D]   (rows permuted, below)
      blk.N.attn_v.weight [Hkv*Dh, D]  blk.N.attn_output.weight [D, H*Dh]
      blk.N.ffn_gate_inp.weight [E, D] (the router)
      blk.N.ffn_gate_exps.weight [E, F, D]  blk.N.ffn_up_exps.weight [E, F, D]  (w1, w3)
      blk.N.ffn_down_exps.weight [E, D, F]  (w2)
  - q and k rows permuted per head: Hugging Face rotates the two halves of a head (rotate_half),
    llama.cpp's "llama" rope rotates adjacent pairs, so row 2i of a head in GGUF is HF row i and row
    2i+1 is HF row i + Dh/2: the same dot products after rope.
Tensor types (tensor_type): 1-D tensors (norms) and the router are float32 whatever --type says (as
llama.cpp's own converter keeps them); of the rest,
    --type         routed experts (ffn_{gate,up,down}_exps)   other matrices (embedding, attention, output)
    f32            F32                                        F32
    bf16           BF16                                       BF16
    q8_0           Q8_0                                       Q8_0
    q8_0-experts   Q8_0                                       F32
    q4_0-experts   Q4_0                                       F32
BF16 keeps the checkpoint's bits (no rounding when it is bf16). The "-experts" types match moeinf's
LLM(dtype="float32", expert_dtype="int8" / "int4"): dense layers float32, routed experts quantized.
Q8_0 and Q4_0 come from the `gguf` package's own quantizers (gguf.quants.quantize, written to match
ggml's reference ones): blocks of 32 consecutive inputs of a row, one f16 scale d each, the codes
computed with the float32 d before it is rounded to f16:
    Q8_0  d = max|x| / 127, q = round(x / d) (half away from zero), int8; 34 bytes a block
    Q4_0  d = m / -8 with m the block's value of largest magnitude (its sign kept), q = clamp(
          trunc(x / d + 8.5), 0, 15) (round half up, then + 8); 18 bytes a block: d, then 16 bytes
          holding weights 0..15 in their low nibbles and 16..31 in their high ones; x = (q - 8) d
so a quantized tensor's rows (its last dimension) must be a multiple of 32 long (ConversionError).
The file is written next to OUT under a temporary name and renamed into place when complete.
Without the `gguf` package (moeinf's own dev environment) the module still imports: the tensor plan
(tensors, tensor_type) works, and convert raises ConversionError.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

try:
    import gguf
except ModuleNotFoundError:  # moeinf's dev environment: the tensor plan works, convert refuses
    gguf = None


@dataclass(frozen=True)
class GgufType:
    """One --type: the GGML type of the matrices it converts (gguf.GGMLQuantizationType's name),
    the file type it declares (gguf.LlamaFileType's name), and whether only the routed experts take
    that type (every other matrix float32)."""

    matrices: str
    file_type: str
    experts_only: bool = False


TYPES = {
    "f32": GgufType("F32", "ALL_F32"),
    "bf16": GgufType("BF16", "MOSTLY_BF16"),
    "q8_0": GgufType("Q8_0", "MOSTLY_Q8_0"),
    "q8_0-experts": GgufType("Q8_0", "MOSTLY_Q8_0", experts_only=True),
    "q4_0-experts": GgufType("Q4_0", "MOSTLY_Q4_0", experts_only=True),
}
BLOCK_TYPES = {"Q8_0": 32, "Q4_0": 32}  # the quantized types and their block length (inputs per scale)
ARCH = "llama"
# what tensors() says of each tensor: kept float32 whatever the type (norms, router), a routed
# experts' stack, or another matrix
KEEP_F32, EXPERTS, DENSE = "keep-f32", "experts", "dense"


class ConversionError(Exception):
    """The checkpoint is not one this converter handles (it says what it expected)."""


def rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """weight: [heads * Dh, D] q or k rows, HF half-split order -> llama.cpp adjacent-pair order."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def tensor_type(type_name: str, name: str, role: str, shape: tuple[int, ...]) -> str:
    """The GGML type (a gguf.GGMLQuantizationType name) that tensor `name` of `shape` and `role`
    (tensors()'s) is written in under --type `type_name` (the module docstring's table).
    ConversionError for an unknown type, or a quantized tensor whose rows do not split into blocks."""
    if type_name not in TYPES:
        raise ConversionError(f"expected --type one of {', '.join(TYPES)}, found {type_name!r}")
    spec = TYPES[type_name]
    if role == KEEP_F32 or (spec.experts_only and role != EXPERTS):
        return "F32"
    block = BLOCK_TYPES.get(spec.matrices)
    if block is not None and shape[-1] % block:
        raise ConversionError(
            f"{name}: {spec.matrices} quantizes rows in blocks of {block}, expected a row length that is "
            f"a multiple of {block}, found shape {list(shape)}"
        )
    return spec.matrices


def encoded(tensor: torch.Tensor, ggml_type: str) -> np.ndarray:
    """A tensor as the bytes (or float32 array) the GGUF writer takes for GGML type `ggml_type`."""
    if ggml_type == "F32":
        return tensor.to(torch.float32).numpy()
    if ggml_type == "BF16":
        bits = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.view(np.uint8)  # [..., 2 * n] bytes
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return gguf.quants.quantize(tensor.to(torch.float32).numpy(), qtype)  # [..., n / 32 * 34 or 18] bytes


class MixtralCheckpoint:
    """config.json, tokenizer.json and the safetensors shards of one checkpoint folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        if self.config.get("model_type") != "mixtral":
            raise ConversionError(
                f"expected a Mixtral checkpoint (model_type mixtral), found {self.config.get('model_type')!r}"
            )
        self.files = [safe_open(str(p), framework="pt") for p in sorted(folder.glob("*.safetensors"))]
        if not self.files:
            raise ConversionError(f"expected *.safetensors in {folder}, found none")
        self.where = {name: f for f in self.files for name in f.keys()}

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"expected tensor {name} in {self.folder}, found no such tensor")
        return self.where[name].get_tensor(name)

    def experts(self, layer: int, which: str) -> torch.Tensor:
        """[E, rows, cols]: expert matrix w1, w2 or w3 of every expert of `layer`, stacked."""
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        return torch.stack(
            [self.tensor(f"{prefix}.{e}.{which}.weight") for e in range(self.config["num_local_experts"])]
        )


def add_metadata(writer: gguf.GGUFWriter, config: dict, file_type: gguf.LlamaFileType) -> None:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 1e6)}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"expected default rope, found {rope}")
    writer.add_name(config.get("_name_or_path") or "moeinf checkpoint")
    writer.add_file_type(file_type)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_vocab_size(config["vocab_size"])


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's bytes_to_unicode): character -> byte value.
    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 upwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    """tokenizer.json's vocabulary in id order, as llama.cpp's SentencePiece-style "llama" vocab.

    A byte-level BPE without merges (as the default model's) cannot be written as GGUF's "gpt2"
    tokenizer, which needs a merges array and the writer drops empty ones; its single-byte tokens
    become SentencePiece byte tokens "<0xXX>" instead, multi-byte ones normal tokens of their text,
    special tokens control tokens: every id names the same bytes in both engines."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"expected a BPE tokenizer.json, found {model.get('type')!r}")
    alphabet = byte_level_alphabet()
    special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    pieces: dict[int, tuple[str, gguf.TokenType]] = {}
    for token, i in model["vocab"].items():
        if i in special:
            pieces[i] = (special[i], gguf.TokenType.CONTROL)
        elif len(token) == 1 and token in alphabet:
            pieces[i] = (f"<0x{alphabet[token]:02X}>", gguf.TokenType.BYTE)
        else:
            text = bytes(alphabet[c] for c in token).decode("utf-8", errors="replace")
            pieces[i] = (text, gguf.TokenType.NORMAL)
    for i, content in special.items():
        pieces.setdefault(i, (content, gguf.TokenType.CONTROL))
    vocab = config["vocab_size"]
    tokens = [pieces.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([text for text, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])
    writer.add_token_scores([0.0] * vocab)
    unk = next((i for i, (text, _) in enumerate(tokens) if text == "<unk>"), None)
    if unk is not None:
        writer.add_unk_token_id(unk)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)  # ids are given as they are


def tensor_count(config: dict) -> int:
    """How many tensors tensors() yields: embedding, final norm and output, 10 a layer."""
    return 3 + 10 * config["num_hidden_layers"]


def tensors(checkpoint: MixtralCheckpoint):
    """(GGUF name, tensor, role: KEEP_F32, EXPERTS or DENSE) for every tensor of the model, in file order."""
    config = checkpoint.config
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    yield "token_embd.weight", checkpoint.tensor("model.embed_tokens.weight"), DENSE
    for layer in range(config["num_hidden_layers"]):
        hf, blk = f"model.layers.{layer}", f"blk.{layer}"
        yield f"{blk}.attn_norm.weight", checkpoint.tensor(f"{hf}.input_layernorm.weight"), KEEP_F32
        yield f"{blk}.attn_q.weight", rope_pairs(checkpoint.tensor(f"{hf}.self_attn.q_proj.weight"), heads), DENSE
        yield f"{blk}.attn_k.weight", rope_pairs(checkpoint.tensor(f"{hf}.self_attn.k_proj.weight"), kv_heads), DENSE
        yield f"{blk}.attn_v.weight", checkpoint.tensor(f"{hf}.self_attn.v_proj.weight"), DENSE
        yield f"{blk}.attn_output.weight", checkpoint.tensor(f"{hf}.self_attn.o_proj.weight"), DENSE
        yield f"{blk}.ffn_norm.weight", checkpoint.tensor(f"{hf}.post_attention_layernorm.weight"), KEEP_F32
        yield f"{blk}.ffn_gate_inp.weight", checkpoint.tensor(f"{hf}.block_sparse_moe.gate.weight"), KEEP_F32
        yield f"{blk}.ffn_gate_exps.weight", checkpoint.experts(layer, "w1"), EXPERTS
        yield f"{blk}.ffn_up_exps.weight", checkpoint.experts(layer, "w3"), EXPERTS
        yield f"{blk}.ffn_down_exps.weight", checkpoint.experts(layer, "w2"), EXPERTS
    yield "output_norm.weight", checkpoint.tensor("model.norm.weight"), KEEP_F32
    lm_head = "model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"
    yield "output.weight", checkpoint.tensor(lm_head), DENSE


def convert(folder: Path, out: Path, type_name: str) -> Path:
    """Writes `out` (GGUF of `type_name`) from the checkpoint in `folder`; returns `out`."""
    if type_name not in TYPES:
        raise ConversionError(f"expected --type one of {', '.join(TYPES)}, found {type_name!r}")
    if gguf is None:
        raise ConversionError("expected the `gguf` package (pip install gguf), found it not installed")
    file_type = gguf.LlamaFileType[TYPES[type_name].file_type]
    checkpoint = MixtralCheckpoint(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(partial), ARCH)
        add_metadata(writer, checkpoint.config, file_type)
        add_tokenizer(writer, folder, checkpoint.config)
        count = tensor_count(checkpoint.config)
        for name, tensor, role in tqdm(tensors(checkpoint), total=count, desc=f"gguf {type_name}", unit="tensor"):
            ggml_type = tensor_type(type_name, name, role, tuple(tensor.shape))
            raw = None if ggml_type == "F32" else gguf.GGMLQuantizationType[ggml_type]
            writer.add_tensor(name, encoded(tensor, ggml_type), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint folder (Mixtral architecture)")
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument(
        "--type",
        default="f32",
        choices=list(TYPES),
        help="f32, bf16, q8_0: every matrix in that type; q8_0-experts, q4_0-experts: the routed experts only",
    )
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.out, args.type)
    except ConversionError as error:
        print(f"gguf_convert: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
