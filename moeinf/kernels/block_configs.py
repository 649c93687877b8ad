"""Block sizes of the fused MoE GEMMs: tuned offline, stored as JSON, looked up by shape, dtype and
device, with a heuristic by the number of tokens where no file matches. Nothing is tuned on the
hot path: a lookup is a dict access after the first call for a shape.

File format. One file per (E, N, K, dtype, device) in moeinf/kernels/configs/, named

    E=<E>,N=<N>,K=<K>,dtype=<dtype>,device=<device>.json                  fused_moe (float weights)
    E=<E>,N=<N>,K=<K>,dtype=<dtype>,format=<format>,device=<device>.json  fused_quant_moe

    E       number of experts (the length of the slot table, shared experts included)
    N       the expert ffn size F (w13 is [S, 2F, D], w2 is [S, D, F])
    K       the hidden size D
    dtype   the compute dtype's torch name without "torch.": bfloat16, float16, float32 (for the
            quantized kernels: x's dtype, whatever the weights' format)
    format  quantized weights only (quant_moe.py's format_key): "int8", "int4", or w13's and w2's
            formats joined by "_" where they differ, e.g. "int8_int4"; lower-case letters, digits, "_"
    device  torch.cuda.get_device_name() with every character outside [A-Za-z0-9_.-] as "_",
            e.g. NVIDIA_H200

holding

    {
      "tuned": true,
      "source": "who tuned it, how and when (free text)",
      "configs": {
        "<M>": {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1,
                "num_warps": 4, "num_stages": 3},
        ...
      }
    }

M is the number of tokens T of the call (not T * top_k). A call uses the entry whose M is nearest
its T (the smaller M on a tie). A file whose "tuned" is false is an example of the format and is
never used for a real device (see configs/E=8,N=14336,K=4096,dtype=bfloat16,device=EXAMPLE_NOT_TUNED.json).
bench/tune_moe.py measures candidates on a GPU and writes the files with write_config_file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path

import torch

from moeinf.atomic_write import write_text_atomic

CONFIG_DIR = Path(__file__).with_name("configs")
INTERPRETER_DEVICE = "triton_interpreter"


@dataclass(frozen=True)
class BlockConfig:
    block_m: int  # rows (token, expert) pairs per program; each expert's pairs are padded to it
    block_n: int  # output columns per program
    block_k: int  # reduction step
    group_m: int  # row blocks visited together, so their programs share weight tiles in L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockConfig.{name}: expected a power of two >= 16 (tl.dot's minimum), found {value}")
        for name in ("group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockConfig.{name}: expected a positive integer, found {getattr(self, name)}")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_name(device: torch.device) -> str:
    """The name block-config files are keyed by."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_DEVICE
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_device_name(index: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", torch.cuda.get_device_name(index))


def config_file_name(
    num_experts: int, ffn: int, hidden: int, dtype: torch.dtype, device: str, format: str | None = None
) -> str:
    """The file name of (E, N, K, dtype, device), and of a quantized weight format (None: float weights)."""
    dtype_name = str(dtype).removeprefix("torch.")
    if format is None:
        return f"E={num_experts},N={ffn},K={hidden},dtype={dtype_name},device={device}.json"
    if not isinstance(format, str) or not re.fullmatch(r"[a-z0-9_]+", format):
        raise ValueError(f"block config format: expected lower-case letters, digits and '_', found {format!r}")
    return f"E={num_experts},N={ffn},K={hidden},dtype={dtype_name},format={format},device={device}.json"


def heuristic_config(num_tokens: int, num_experts: int, device: str) -> BlockConfig:
    """The fallback where no tuned file matches."""
    if device == INTERPRETER_DEVICE:
        # the interpreter runs programs one after another with numpy: fewer, larger programs win
        return BlockConfig(block_m=32, block_n=64, block_k=64, group_m=1)
    if num_tokens <= num_experts:
        # decode: about one token per expert, so small row blocks waste the least padding
        return BlockConfig(block_m=16, block_n=32, block_k=64, group_m=1)
    return BlockConfig(block_m=64, block_n=64, block_k=32, group_m=8)


def read_config_file(path: Path) -> tuple[bool, dict[int, BlockConfig]]:
    """Parses one config file into (tuned, {M: config}); raises ValueError naming the file and what
    is wrong in it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"block config {path}: expected a readable JSON file, found {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("configs"), dict) or not data["configs"]:
        raise ValueError(f'block config {path}: expected an object with a non-empty "configs" object')
    if not isinstance(data.get("tuned"), bool):
        raise ValueError(f'block config {path}: expected "tuned": true or false, found {data.get("tuned")!r}')
    names = {f.name for f in fields(BlockConfig)}
    table = {}
    for key, entry in data["configs"].items():
        if not key.isdigit() or not isinstance(entry, dict) or set(entry) != names:
            raise ValueError(
                f"block config {path}: expected entries '<M>': {{{', '.join(sorted(names))}}}, found {key!r}: {entry!r}"
            )
        if not all(isinstance(v, int) for v in entry.values()):
            raise ValueError(f"block config {path}, M={key}: expected integer values, found {entry!r}")
        table[int(key)] = BlockConfig(**entry)
    return data["tuned"], table


def write_config_file(
    folder: Path,
    num_experts: int,
    ffn: int,
    hidden: int,
    dtype: torch.dtype,
    device: str,
    configs: dict[int, BlockConfig],
    source: str,
    tuned: bool = True,
    format: str | None = None,
) -> Path:
    """Writes the config file for (E, N, K, dtype, device) into `folder` in the format above, atomically
    (a temp file beside it, then one rename, so a reader never sees half a file); returns its path.
    format: the quantized weights' format key (None: float weights). Later lookups in this process
    see the new file."""
    if not configs:
        raise ValueError("block config: expected at least one '<M>' entry, found none")
    bad = {m: c for m, c in configs.items() if not isinstance(m, int) or m < 1 or not isinstance(c, BlockConfig)}
    if bad:
        raise ValueError(f"block config: expected {{M >= 1: BlockConfig}} entries, found {bad!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / config_file_name(num_experts, ffn, hidden, dtype, device, format)
    data = {"tuned": bool(tuned), "source": source, "configs": {str(m): asdict(configs[m]) for m in sorted(configs)}}
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    _tuned_table.cache_clear()
    return path


@cache
def _tuned_table(path: Path) -> dict[int, BlockConfig] | None:
    if not path.is_file():
        return None
    tuned, table = read_config_file(path)
    return table if tuned else None


def moe_block_config(
    num_experts: int,
    ffn: int,
    hidden: int,
    dtype: torch.dtype,
    num_tokens: int,
    device: str,
    folder: Path = CONFIG_DIR,
    format: str | None = None,
) -> BlockConfig:
    """The block config for a fused-MoE call on T = num_tokens tokens: the tuned entry with the
    nearest M if a tuned file for (E, N, K, dtype, device) exists, else the heuristic. format: the
    quantized weights' format key (fused_quant_moe), None for float weights (fused_moe)."""
    table = _tuned_table(Path(folder) / config_file_name(num_experts, ffn, hidden, dtype, device, format))
    if table is None:
        return heuristic_config(num_tokens, num_experts, device)
    return table[min(table, key=lambda m: (abs(m - num_tokens), m))]
