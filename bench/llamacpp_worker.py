"""llama.cpp's side of bench/llamacpp.py: one GGUF model behind a line protocol on stdin/stdout.

Runs in the benchmark's own environment (llama-cpp-python built there), started by
bench/llamacpp.py as `python -m bench.llamacpp_worker MODEL.gguf --threads N --context C --kv-type T`.
Each request is one JSON line; each answer one JSON line:
  {"op": "generate", "prompt": [ids], "new_tokens": n, "exact": bool}
      -> {"tokens": [ids]}   greedy (argmax of the logits); exact: EOS ignored, else it stops there
  {"op": "logits", "prompt": [ids]}  -> {"logits": [V floats]}  of the prompt's last position
  {"op": "quit"}                     -> the process exits
Errors answer {"error": "..."}. The cache is cleared before every request, so each one is a fresh
prompt, as a moeinf generate call is.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from llama_cpp import Llama

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # ggml_type ids: GGML_TYPE_F32, _F16, _BF16


class GreedyLlama:
    def __init__(self, model: str, threads: int, context: int, kv_type: str):
        self.llm = Llama(
            model_path=model,
            n_ctx=context,
            n_batch=min(context, 2048),
            n_ubatch=min(context, 512),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            type_k=KV_TYPES[kv_type],  # the KV cache in the model's dtype, as moeinf keeps it
            type_v=KV_TYPES[kv_type],  # (llama.cpp's default is f16)
            verbose=False,
        )
        self.eos = self.llm.token_eos()
        self.vocab = self.llm.n_vocab()

    def _last_logits(self) -> np.ndarray:
        """[V] float32 logits of the last evaluated position (llama-cpp-python keeps its `scores`
        only with logits_all, which would make llama.cpp compute every prompt position's)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab,))

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        """Evaluates the prompt from an empty cache; returns the last position's logits [V]."""
        self.llm.reset()
        self.llm.eval(prompt)
        return self._last_logits()

    def generate(self, prompt: list[int], new_tokens: int, exact: bool) -> list[int]:
        logits = self._prefill(prompt)
        tokens: list[int] = []
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            if len(tokens) == new_tokens or (not exact and token == self.eos):
                return tokens
            self.llm.eval([token])
            logits = self._last_logits()

    def logits(self, prompt: list[int]) -> list[float]:
        return self._prefill(prompt).astype(np.float64).tolist()


def serve(model: GreedyLlama) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "quit":
                return
            if op == "generate":
                answer = {"tokens": model.generate(request["prompt"], request["new_tokens"], request["exact"])}
            elif op == "logits":
                answer = {"logits": model.logits(request["prompt"])}
            else:
                answer = {"error": f"expected op generate, logits or quit, found {op!r}"}
        except (KeyError, ValueError, RuntimeError) as error:
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="GGUF file")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, required=True, help="KV cache positions")
    parser.add_argument("--kv-type", choices=sorted(KV_TYPES), required=True, help="KV cache dtype")
    args = parser.parse_args()
    serve(GreedyLlama(args.model, args.threads, args.context, args.kv_type))
    return 0


if __name__ == "__main__":
    sys.exit(main())
