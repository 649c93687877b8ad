"""The offloading baseline MoE-Infinity measured itself against: transformers with Accelerate's
big-model inference (device_map="auto" under a memory cap), on the same checkpoint and budget.

Accelerate places whole decoder layers: those that fit under max_memory on the device stay there,
the rest stay in host memory (or on disk where host memory is capped too) and are copied to the
execution device by hooks on every forward, all their experts, routed to or not. moeinf keeps the
same bytes of experts resident and moves only the experts a layer routes to that are missing.

Used by bench/gpu_offload.py (on CUDA: device cap = dense weights + budget x all experts, host
uncapped; its --smoke run on the CPU caps host memory the same way and offloads the rest to disk,
which only checks that this code runs).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moeinf.loaders.checkpoint import Checkpoint


def checkpoint_bytes(model: Path) -> tuple[int, int]:
    """(dense bytes, all routed experts' bytes) of a bf16 checkpoint."""
    spec = Checkpoint.open(model).spec
    total = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    experts = spec.expert_params * spec.num_moe_layers * spec.num_experts * 2
    return total - experts, experts


def load(model: Path, budget: float, device: str, offload_dir: Path):
    """transformers' model of `model` in bf16 under Accelerate, with dense + budget x experts bytes
    allowed on `device` (the rest on the host; on the CPU, on disk)."""
    from transformers import AutoModelForCausalLM

    dense, experts = checkpoint_bytes(model)
    cap = int(dense + budget * experts)
    max_memory = {0: cap, "cpu": 2**40} if device == "cuda" else {"cpu": cap}
    return AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.bfloat16, device_map="auto", max_memory=max_memory, offload_folder=str(offload_dir)
    ).eval()


def decode_run(model: Path, budget: float, device: str, offload_dir: Path, new_tokens: int) -> dict:
    """Decode speed of transformers + Accelerate at `budget`: greedy generations of 1 and of
    new_tokens tokens from the prompt bench/gpu_offload.py uses; decode tok/s = (new_tokens - 1) /
    the difference of their times (the prefill cancels)."""
    load_start = time.perf_counter()
    hf = load(model, budget, device, offload_dir)
    load_s = time.perf_counter() - load_start
    prompt = torch.tensor([list(range(3, 35))], device=device)

    def generate(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - start

    generate(2)  # warm-up
    one, full = generate(1), generate(new_tokens)
    placement = {name: str(where) for name, where in getattr(hf, "hf_device_map", {}).items()}
    num_layers = hf.config.num_hidden_layers
    return {
        "engine": "transformers+accelerate",
        "budget": budget,
        "load_s": load_s,
        "decode_tok_s": (new_tokens - 1) / max(full - one, 1e-9),
        "layers_on_device": layers_on_device(placement, num_layers, "0" if device == "cuda" else "cpu"),
        "num_layers": num_layers,
        "placement": placement,
    }


def layers_on_device(placement: dict[str, str], num_layers: int, device: str) -> int:
    """Decoder layers Accelerate placed on the execution device (the others move there on every
    forward). placement: hf_device_map, by module name ("model.layers" when it keeps them whole)."""
    if placement.get("model.layers") is not None:
        return num_layers if placement["model.layers"] == device else 0
    return sum(1 for i in range(num_layers) if placement.get(f"model.layers.{i}") == device)
