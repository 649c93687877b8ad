"""What a replayed step costs: the GPU computing, the model whose experts move, the link they cross.

Per-layer compute is the time to stream the weights a decode token reads through HBM on one
H100-class GPU, since batch-1 decode is memory-bound; prefill steps take the larger of that and
their FLOPs at an effective tensor-core rate. Attention's KV reads are left out (short contexts:
Mixtral reads 4 KB of KV per layer per cached token, under 1% of its 84 MB of attention weights at
1k tokens). The figures and their sources are beside each constant below.

Expert formats: each ModelCost holds its model's native figures (bf16 experts for Mixtral and
Qwen3, FP8 for DeepSeek-V3); `ModelCost.with_expert_format(name)` (and `profile_for(...,
expert_format=name)`) gives the same model with its routed experts stored as the runtime stores
them on request (loaders/expert_format.py's --expert-dtype names, EXPERT_FORMATS here), their bytes
exact from loaders/expert_record.py's record fields at the model's hidden size D and expert width
F. Only the routed experts change: dense layers, the router and shared experts stay as they were,
and so does the FLOP count (expert_params is the number of weights, whatever they are stored in).
Everything that reads an expert's weights scales with its bytes: the link (load_s), the host
kernels and the GPU where they are bandwidth-bound (host_expert_s, device_experts_s). The model
assumes the quantized kernels keep the float kernels' effective bandwidth and FLOP rate (the
dequantisation hidden under the memory reads, as batch-1 decode lets it be); a host or GPU whose
int4 kernels are compute-bound runs slower than this says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moeinf.errors import ReplayConfigError
from moeinf.runtime.cache.placement import ExpertCosts
from moeinf.runtime.traces import Trace

if TYPE_CHECKING:  # annotations only: replay runs where torch is not installed
    from moeinf.models.spec import ModelSpec
    from moeinf.runtime.dense_weights import DenseWeights


@dataclass(frozen=True)
class Gpu:
    """What the compute side of one step costs."""

    name: str
    hbm_bytes_per_s: float  # effective, for streaming weights (memory-bound decode)
    flops_per_s: float  # effective dense tensor-core rate (only prefill steps get near it)
    layer_overhead_s: float  # kernel launches and host bookkeeping per layer


# H100 SXM5: HBM3 peak 3.35 TB/s and 989 TFLOP/s dense BF16 (NVIDIA H100 datasheet). Memory-bound
# GEMV-like kernels reach roughly 75-80% of peak bandwidth, hence 2.6 TB/s; large GEMMs about 60%
# of the tensor-core peak, hence 600 TFLOP/s. About a dozen kernels per layer at 1-2 us each, and
# the runtime's per-layer Python, give ~20 us of fixed cost per layer.
H100 = Gpu("H100-SXM-class", hbm_bytes_per_s=2.6e12, flops_per_s=600e12, layer_overhead_s=20e-6)


# loaders/expert_record.py's FIELD_ALIGN: each field of a quantized record starts on a 64-byte
# boundary. Restated, not imported, since replay runs without torch; tests/runtime/replay/
# test_expert_formats.py checks that the bytes below equal RecordLayout's.
RECORD_FIELD_ALIGN = 64
NATIVE = "native"  # the model's own expert format: the ModelCost figures as written


@dataclass(frozen=True)
class ExpertFormatCost:
    """How a quantized routed expert is stored, as far as its bytes go: loaders/expert_format.py's
    round-to-nearest formats, laid out as loaders/expert_record.py's record fields (w13 [2F, D],
    w2 [D, F]; D hidden size, F the expert's FFN width):

        int8    q int8 [rows, inputs] (1 B a weight) + scale float32 [rows]         per matrix
        int4    q uint8 [rows, inputs / 2] (0.5 B a weight) + scale float16
                [rows, inputs / G] (2 B per G inputs), symmetric (no zero array)    per matrix
    """

    name: str  # its --expert-dtype name: int8, int4 (groups of 32), int4-g64, int4-g128
    kind: str  # "int8" or "int4"
    group_size: int | None = None  # int4: inputs per float16 scale (G)

    def field_nbytes(self, rows: int, inputs: int) -> tuple[int, int]:
        """(q, scale) bytes of one matrix [rows, inputs] in this format."""
        if self.kind == "int8":
            return rows * inputs, 4 * rows
        if inputs % self.group_size or inputs % 2:
            raise ReplayConfigError(
                f"expert format {self.name}: expected the group size {self.group_size} to divide a matrix's "
                f"{inputs} inputs, found a remainder of {inputs % self.group_size}"
            )
        return rows * inputs // 2, 2 * rows * (inputs // self.group_size)

    def expert_bytes(self, hidden_size: int, expert_ffn: int) -> int:
        """Bytes of one expert's record payload (w13, then w2; each field on a RECORD_FIELD_ALIGN
        boundary), the bytes a load moves and a kernel reads; the record's padding up to 4 KiB is
        left out, as it is for the float formats."""
        D, F = hidden_size, expert_ffn
        end = 0
        for nbytes in (*self.field_nbytes(2 * F, D), *self.field_nbytes(D, F)):
            end = -(-end // RECORD_FIELD_ALIGN) * RECORD_FIELD_ALIGN + nbytes
        return end

    def bytes_per_weight(self) -> float:
        """Bytes per weight when the shapes are unknown: int4's q and scales exactly (0.5 + 2 / G),
        int8's q only (its float32 scale per row, 4 (2F + D) B an expert, is left out: a relative
        4 (2F + D) / (3 D F), 0.03% at D = F = 4096, 6% at D = F = 64)."""
        return 1.0 if self.kind == "int8" else 0.5 + 2 / self.group_size


EXPERT_FORMATS: dict[str, ExpertFormatCost] = {
    f.name: f
    for f in (
        ExpertFormatCost("int8", "int8"),  # per output channel, float32 scales
        ExpertFormatCost("int4", "int4", 32),  # llama.cpp Q4_0's block, the runtime's int4 default
        ExpertFormatCost("int4-g64", "int4", 64),
        ExpertFormatCost("int4-g128", "int4", 128),
    )
}
EXPERT_FORMAT_CHOICES = (NATIVE, *EXPERT_FORMATS)


def expert_format_cost(name: str) -> ExpertFormatCost | None:
    """The ExpertFormatCost called `name`; None for "native" (the model's own figures)."""
    if name == NATIVE:
        return None
    if not isinstance(name, str) or name not in EXPERT_FORMATS:
        raise ReplayConfigError(f"expert format: expected one of {', '.join(EXPERT_FORMAT_CHOICES)}, found {name!r}")
    return EXPERT_FORMATS[name]


@dataclass(frozen=True)
class ModelCost:
    """What one decode token reads, for one model. Layers are the trace's layers (MoE layers).
    Bytes are bytes; D = hidden_size, F = expert_ffn (elements)."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int  # one routed expert, as stored in expert_format: w1, w3 [F, D] and w2 [D, F]
    layer_dense_bytes: int  # per MoE layer, read every step: attention, router, shared experts
    step_bytes: int  # per step outside the MoE layers: lm head, dense-FFN layers
    bytes_per_param: float  # of the dense weights (layer_dense_bytes); the native experts' too
    aliases: tuple[str, ...] = ()  # lower-case substrings of meta["model"] that name this model
    hidden_size: int | None = None  # D (None: unknown, as for a trace's own meta["cost"] without it)
    expert_ffn: int | None = None  # F, one routed expert's intermediate width
    expert_format: str = NATIVE  # NATIVE, or a name in EXPERT_FORMATS (with_expert_format)
    expert_weights: float | None = None  # weights of one routed expert; None: expert_bytes / bytes_per_param

    @property
    def expert_params(self) -> float:
        """Weights of one routed expert (3 D F, plus biases where a family has them): what its FLOPs
        count, 2 a weight a token, whatever format its bytes are in."""
        return self.expert_bytes / self.bytes_per_param if self.expert_weights is None else self.expert_weights

    @property
    def expert_bytes_per_param(self) -> float:
        """Bytes a routed expert's weight takes as stored (the dense weights': bytes_per_param)."""
        return self.expert_bytes / self.expert_params

    def with_expert_format(self, name: str) -> ModelCost:
        """This model with its routed experts stored in `name` (EXPERT_FORMAT_CHOICES): expert_bytes
        exact from the record layout at (hidden_size, expert_ffn), or, where those are unknown,
        expert_params x the format's bytes per weight (ExpertFormatCost.bytes_per_weight says what
        that leaves out). Everything else, FLOPs included, is unchanged."""
        fmt = expert_format_cost(name)
        if self.expert_format != NATIVE:
            raise ReplayConfigError(
                f"{self.name} with expert format {name!r}: expected the model's native costs to convert, found "
                f"them in {self.expert_format!r} already"
            )
        if fmt is None:
            return self
        if self.hidden_size is not None and self.expert_ffn is not None:
            expert_bytes = fmt.expert_bytes(self.hidden_size, self.expert_ffn)
        else:
            expert_bytes = math.ceil(self.expert_params * fmt.bytes_per_weight())
        return replace(
            self, expert_bytes=expert_bytes, expert_format=fmt.name, expert_weights=float(self.expert_params)
        )

    def matches(self, num_layers: int, num_experts: int, top_k: int) -> bool:
        return (self.num_layers, self.num_experts, self.top_k) == (num_layers, num_experts, top_k)


MODELS: dict[str, ModelCost] = {
    m.name: m
    for m in (
        # Mixtral-8x7B (config.json: hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128,
        # vocab 32000), served in bf16 as this runtime does (the shared traces were recorded with
        # FP8 weights, which changes routing by little and bytes not at all for us).
        # expert 3 * 4096 * 14336 * 2 B = 352 MB; attention 4096 * (4096 + 2 * 1024) + 4096 * 4096
        # params + router 4096 * 8 -> 84 MB per layer; lm head 32000 * 4096 * 2 B = 262 MB.
        ModelCost(
            "mixtral-8x7b",
            32,
            8,
            2,
            expert_bytes=3 * 4096 * 14336 * 2,
            layer_dense_bytes=(4096 * (4096 + 2 * 1024) + 4096 * 4096 + 4096 * 8) * 2,
            step_bytes=32000 * 4096 * 2,
            bytes_per_param=2,
            aliases=("mixtral-8x7b", "mixtral 8x7b"),
            hidden_size=4096,
            expert_ffn=14336,
        ),
        # Qwen3-30B-A3B (config.json: hidden 2048, moe_intermediate 768, 32 heads / 4 KV heads of
        # 128, 48 layers, 128 experts top-8, vocab 151936, untied lm head), bf16.
        # expert 3 * 2048 * 768 * 2 B = 9.4 MB; attention 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048
        # params + router 2048 * 128 -> 40 MB per layer; lm head 151936 * 2048 * 2 B = 622 MB.
        ModelCost(
            "qwen3-30b-a3b",
            48,
            128,
            8,
            expert_bytes=3 * 2048 * 768 * 2,
            layer_dense_bytes=(2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2048 * 128) * 2,
            step_bytes=151936 * 2048 * 2,
            bytes_per_param=2,
            aliases=("qwen3-30b-a3b",),
            hidden_size=2048,
            expert_ffn=768,
        ),
        # DeepSeek-V3 (config.json: hidden 7168, moe_intermediate 2048, 61 layers of which the first
        # 3 are dense (intermediate 18432), 256 routed experts top-8 + 1 shared, MLA with q_lora
        # 1536, kv_lora 512, 128 heads, vocab 129280), in its native FP8 (1 B/param, block scales
        # negligible). expert 3 * 7168 * 2048 B = 44 MB. Per MoE layer: MLA (q_a 7168x1536, q_b
        # 1536x24576, kv_a 7168x576, kv_b 512x32768, o 16384x7168 = 187 M) + shared expert (44 M)
        # + router (7168x256) -> 233 MB. Per step: 3 dense layers (187 M + 3 * 7168 * 18432 each)
        # = 1.75 GB and the bf16 lm head 129280 * 7168 * 2 B = 1.85 GB.
        ModelCost(
            "deepseek-v3",
            58,
            256,
            8,
            expert_bytes=3 * 7168 * 2048,
            layer_dense_bytes=(
                7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168 + 3 * 7168 * 2048 + 7168 * 256
            ),
            step_bytes=3 * (7168 * 1536 + 1536 * 24576 + 7168 * 576 + 512 * 32768 + 16384 * 7168 + 3 * 7168 * 18432)
            + 129280 * 7168 * 2,
            bytes_per_param=1,
            aliases=("deepseek-v3", "deepseek v3"),
            hidden_size=7168,
            expert_ffn=2048,
        ),
    )
}

# Effective host-to-device bandwidth of the link experts cross.
LINKS: dict[str, float] = {
    # PCIe 4.0 x16: 31.5 GB/s raw per direction; pinned H2D copies measure 24-26 GB/s (CUDA
    # bandwidthTest on A100-class hosts).
    "pcie4": 25e9,
    # PCIe 5.0 x16: 63 GB/s raw; pinned H2D copies on H100 hosts measure 50-55 GB/s.
    "pcie5": 50e9,
    # One PCIe 4.0 x4 NVMe SSD: ~7 GB/s sequential read (e.g. Samsung 990 Pro: 7.45 GB/s), the
    # bottleneck when experts come from disk with no host tier.
    "nvme": 7e9,
}


@dataclass(frozen=True)
class Host:
    """The host side of hybrid execution: experts computed where their weights sit in host memory."""

    name: str
    bytes_per_s: float  # effective read bandwidth of the host kernels over an expert's weights
    flops_per_s: float  # effective rate of the host kernels once tokens make them compute-bound
    layer_overhead_s: float = 30e-6  # per layer with host work: activations both ways, kernel start


# Two-socket-class servers as the hybrid systems run them (KTransformers, llama.cpp -ot exps=CPU).
# ddr4: 8 channels of DDR4-3200 are 205 GB/s peak a socket; GEMV-like kernels read about half of
# it across NUMA and threads, hence ~100 GB/s; AVX-512 FMA at ~2 TFLOP/s effective in bf16.
# ddr5: 12 channels of DDR5-4800, 460 GB/s peak a socket, ~250 GB/s effective; AMX tiles, ~8 TFLOP/s.
HOSTS: dict[str, Host] = {
    "ddr4": Host("ddr4", bytes_per_s=100e9, flops_per_s=2e12),
    "ddr5": Host("ddr5", bytes_per_s=250e9, flops_per_s=8e12),
}


@dataclass(frozen=True)
class ReplayProfile:
    """The link experts cross, the model whose experts they are, the GPU computing, and the host
    computing the experts placed there (None: no host compute, every miss is fetched)."""

    link: str
    link_bytes_per_s: float
    model: ModelCost
    gpu: Gpu = H100
    host: Host | None = None

    @property
    def load_s(self) -> float:
        """Time one expert occupies the link."""
        return self.model.expert_bytes / self.link_bytes_per_s

    def layer_s(self, tokens: int, active_experts: int) -> tuple[float, float]:
        """(dense_s, expert_s): one layer's attention + router, then its experts, for a step of
        `tokens` tokens that routes to `active_experts` distinct experts."""
        m, g = self.model, self.gpu
        dense_flops = 2 * tokens * m.layer_dense_bytes / m.bytes_per_param
        dense_s = max(m.layer_dense_bytes / g.hbm_bytes_per_s, dense_flops / g.flops_per_s) + g.layer_overhead_s
        return dense_s, self.device_experts_s(tokens * m.top_k, active_experts)

    def device_experts_s(self, pairs: int, active_experts: int) -> float:
        """The GPU's time for `active_experts` distinct experts serving `pairs` (token, expert) pairs."""
        m, g = self.model, self.gpu
        return max(active_experts * m.expert_bytes / g.hbm_bytes_per_s, 2 * pairs * m.expert_params / g.flops_per_s)

    def host_expert_s(self, tokens: int) -> float:
        """The host's time for one expert serving `tokens` tokens."""
        m, h = self.model, self.host
        return max(m.expert_bytes / h.bytes_per_s, 2 * tokens * m.expert_params / h.flops_per_s)

    def expert_costs(self) -> ExpertCosts:
        """What Placement("auto") decides by, from this profile's figures."""
        m, g, h = self.model, self.gpu, self.host
        return ExpertCosts(
            m.expert_bytes, 2 * m.expert_params, self.link_bytes_per_s, h.bytes_per_s, h.flops_per_s,
            g.hbm_bytes_per_s, g.flops_per_s,
        )  # fmt: skip

    def step_s(self) -> float:
        """The per-step remainder outside the MoE layers (memory-bound; one row of logits)."""
        return self.model.step_bytes / self.gpu.hbm_bytes_per_s

    def decode_compute_s(self) -> float:
        """Time of one decode token with every expert resident."""
        dense_s, expert_s = self.layer_s(1, self.model.top_k)
        return self.model.num_layers * (dense_s + expert_s) + self.step_s()


COST_FIELDS = ("expert_bytes", "layer_dense_bytes", "step_bytes", "bytes_per_param")
SHAPE_FIELDS = ("hidden_size", "expert_ffn")  # optional in meta["cost"]: both or neither


def model_for(meta: dict) -> ModelCost:
    """The ModelCost a trace's meta describes: its own meta["cost"] (ModelCost's byte fields, as
    `moeinf trace` records them for the model it ran, and optionally SHAPE_FIELDS, which make its
    quantized expert bytes exact), else a known model by name (meta["model"] containing an
    alias), else by shape (num_layers, num_experts, top_k)."""
    shape = (meta["num_layers"], meta["num_experts"], meta["top_k"])
    if "cost" in meta:
        cost = meta["cost"]
        keys = sorted(cost) if isinstance(cost, dict) else None
        if keys not in (sorted(COST_FIELDS), sorted(COST_FIELDS + SHAPE_FIELDS)):
            raise ReplayConfigError(
                f"trace meta.cost: expected the keys {', '.join(COST_FIELDS)} (and optionally both of "
                f"{', '.join(SHAPE_FIELDS)}), found {cost!r}"
            )
        for key in cost:
            value = cost[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ReplayConfigError(f"trace meta.cost.{key}: expected a positive number, found {value!r}")
            if key in SHAPE_FIELDS and value != int(value):
                raise ReplayConfigError(f"trace meta.cost.{key}: expected a whole number of elements, found {value!r}")
        return ModelCost(
            str(meta.get("model", "traced")), *shape, **{k: int(v) if k in SHAPE_FIELDS else v for k, v in cost.items()}
        )
    name = str(meta.get("model", "")).lower()
    for model in MODELS.values():
        if any(alias in name for alias in model.aliases):
            if not model.matches(*shape):
                raise ReplayConfigError(
                    f"trace model {meta['model']!r}: expected {model.name}'s shape (layers, experts, top_k) = "
                    f"{(model.num_layers, model.num_experts, model.top_k)}, found {shape}"
                )
            return model
    for model in MODELS.values():
        if model.matches(*shape):
            return model
    known = ", ".join(f"{m.name} {(m.num_layers, m.num_experts, m.top_k)}" for m in MODELS.values())
    raise ReplayConfigError(
        f"trace model {meta.get('model')!r} with (layers, experts, top_k) = {shape}: expected one of {known}; "
        "build a ReplayProfile with its ModelCost to replay others"
    )


def profile_for(
    trace: Trace,
    link: str = "pcie4",
    gpu: Gpu = H100,
    host: str | Host | None = None,
    expert_format: str | None = None,
) -> ReplayProfile:
    """The profile of `link` (one of LINKS) for the model `trace` was recorded on, with `host` (one
    of HOSTS, a Host, or None for no host compute), its routed experts in `expert_format` (one of
    EXPERT_FORMAT_CHOICES; None or "native": the model's own)."""
    if link not in LINKS:
        raise ReplayConfigError(f"link profile: expected one of {', '.join(LINKS)}, found {link!r}")
    if isinstance(host, str):
        if host not in HOSTS:
            raise ReplayConfigError(f"host profile: expected one of {', '.join(HOSTS)}, found {host!r}")
        host = HOSTS[host]
    model = model_for(trace.meta)
    if expert_format is not None:
        model = model.with_expert_format(expert_format)
    return ReplayProfile(link, LINKS[link], model, gpu, host)


def traced_model_cost(spec: ModelSpec, dense: DenseWeights, bytes_per_param: int) -> dict:
    """meta["cost"] of a trace `moeinf trace` records (ModelCost's byte fields, model_for reads
    them): the bytes one decode token of this model reads, with weights of `bytes_per_param`, and
    the expert's shape (hidden_size, expert_ffn), from which a replay in another expert format
    takes the exact record bytes."""
    moe_layer_params = [dense.layer_params(layer) for layer in spec.moe_layers]
    dense_layer_params = [dense.layer_params(layer) for layer in range(spec.num_layers) if layer not in spec.moe_layers]
    return {
        "expert_bytes": spec.expert_params * bytes_per_param,
        "layer_dense_bytes": round(sum(moe_layer_params) / len(moe_layer_params)) * bytes_per_param,
        "step_bytes": (dense.head_params() + sum(dense_layer_params)) * bytes_per_param,
        "bytes_per_param": bytes_per_param,
        "hidden_size": spec.hidden_size,
        "expert_ffn": spec.expert_ffn,
    }
