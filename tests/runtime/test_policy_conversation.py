"""The policy hears one conversation, whoever drives it: the runtime (executor -> expert source ->
cache controller) and trace replay (replay loop -> the same controller) tell a policy the same
calls in the same order, with the same arguments, for the same routing. So what replay measures is
what the runtime does."""

import numpy as np
import pytest

from moeinf import LLM, SamplingParams
from moeinf.runtime.cache.activation_aware import ActivationAwareLookaheadPolicy
from moeinf.runtime.replay.loop import replay
from moeinf.runtime.traces import TraceBuilder
from tests.checkpoints import save_tiny_mixtral

PROMPT = [1, 5, 9, 13, 2, 7, 11]


class ListeningPolicy(ActivationAwareLookaheadPolicy):
    """Activation-aware with the lookahead, writing down every call it hears from the controller
    about the routing (which victims and prefetches it is asked for depends on when loads land)."""

    def __init__(self, num_layers, num_experts):
        super().__init__(num_layers, num_experts)
        self.heard = []

    def begin_batch(self):
        self.heard.append(("begin_batch",))
        super().begin_batch()

    def lookahead(self, layer, next_counts):
        self.heard.append(("lookahead", layer, [int(c) for c in next_counts]))
        super().lookahead(layer, next_counts)

    def observe(self, layer, token_counts):
        self.heard.append(("observe", layer, [int(c) for c in token_counts]))
        super().observe(layer, token_counts)

    def sequence_finished(self, eam):
        self.heard.append(("sequence_finished", np.asarray(eam).tolist()))
        super().sequence_finished(eam)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("conversation")
    save_tiny_mixtral(path, seed=3)
    return path


def test_replay_tells_the_policy_what_the_runtime_told_it(folder, tmp_path):
    runtime_policy = ListeningPolicy(2, 4)
    with LLM(folder, progress=False, expert_budget=5, offload_dir=tmp_path, policy=runtime_policy) as llm:
        spec = llm.spec
        cost = {"expert_bytes": 4096, "layer_dense_bytes": 4096, "step_bytes": 4096, "bytes_per_param": 4}
        builder = TraceBuilder(spec.num_moe_layers, spec.num_experts, spec.top_k, "tiny", "test", cost=cost)
        llm.generate([PROMPT], SamplingParams(max_new_tokens=6, ignore_eos=True), trace=builder)
    trace = builder.build()
    replay_policy = ListeningPolicy(2, 4)
    replay(trace, replay_policy, 5, "pcie4")

    heard = runtime_policy.heard
    kinds = [call[0] for call in heard]
    # one batch; per step and layer the lookahead (but for the last layer), then the routing
    assert kinds[0] == "begin_batch" and kinds[-1] == "sequence_finished"
    assert kinds[1:-1] == ["lookahead", "observe", "observe"] * 6  # the prefill step and 5 decode steps
    assert heard[1][2] == np.bincount(trace.lookahead[: len(PROMPT), 0].reshape(-1), minlength=4).tolist()
    assert replay_policy.heard == heard
