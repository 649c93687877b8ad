"""Every cache policy moeinf offers, by the name users pass (LLM(policy=...), --policy)."""

from __future__ import annotations

from moeinf.errors import OffloadConfigError
from moeinf.runtime.cache.activation_aware import (
    ActivationAwareLookaheadPolicy,
    ActivationAwarePolicy,
    LookaheadPolicy,
)
from moeinf.runtime.cache.policy import CachePolicy, LFUPolicy, LRUPolicy

__all__ = ["POLICIES", "DEFAULT_POLICY", "make_policy", "CachePolicy", "LRUPolicy", "LFUPolicy"]

POLICIES: dict[str, type[CachePolicy]] = {
    p.name: p for p in (LRUPolicy, LFUPolicy, ActivationAwarePolicy, LookaheadPolicy, ActivationAwareLookaheadPolicy)
}
DEFAULT_POLICY = ActivationAwarePolicy.name


def make_policy(policy: str | CachePolicy, num_layers: int, num_experts: int) -> CachePolicy:
    if isinstance(policy, CachePolicy):
        return policy
    if policy not in POLICIES:
        raise OffloadConfigError(f"policy: expected one of {', '.join(sorted(POLICIES))}, found {policy!r}")
    return POLICIES[policy](num_layers, num_experts)
