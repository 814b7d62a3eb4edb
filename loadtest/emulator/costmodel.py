"""Decode-step and prefill durations of an MoE model on one H100 SXM, from public numbers.

The model (derivation and sources in docs/emulator-cost-model.md):

    decode_step = time_scale * (
        sum over MoE layers l of [ moe_layer_fixed + distinct_l * expert_bytes / BW ]
      + batch * flops_per_token / FLOPS          # small per-token compute term
      + dense_bytes / BW                         # attention projections, shared experts, lm_head
      + kv_tokens * kv_bytes_per_token / BW )    # attention reads the KV cache
    prefill    = time_scale * num_tokens * 2 * active_params / FLOPS   # compute bound

A decode step is memory-bandwidth bound: each MoE layer streams the weights of every *distinct*
expert any request in the batch uses, so the step time grows with the union of experts, not with
the batch size. `moe_layer_fixed` (kernel launches, gating, top-k, scatter/gather that do not
scale with experts) is not a free knob: it is solved from the paper's measured curve, one MoE
layer being 4.7x slower with 128 than with 16 active experts at batch 64 (ELDR, arXiv
2607.00466, Qwen3-30B-A3B), given the bandwidth-derived per-expert time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from zones.geometry import ModelGeometry

# NVIDIA H100 SXM5 datasheet: HBM3 3.35 TB/s; BF16 Tensor Core 989.4 TFLOPS dense (the 1,979
# figure assumes 2:4 sparsity). https://www.nvidia.com/en-us/data-center/h100/
H100_SXM_HBM_BYTES_PER_S = 3.35e12
H100_SXM_BF16_DENSE_FLOPS = 989.4e12
# Achievable fraction of that bandwidth when streaming expert weights, measured in this repo on an
# H100 80GB HBM3 (benchmarks/gpu/moe_layer_curve.py, results/moe_layer_curve_h100_cudagraph.json):
# one Qwen3-30B-A3B MoE layer's expert GEMMs under CUDA graphs at batch 64 took 89.5 us with 16
# active experts and 479.1 us with 128, i.e. (479.1 - 89.5) / 112 = 3.48 us per extra 9.44 MB
# expert = 2.71 TB/s = 0.81 of 3.35 TB/s. It scales every bandwidth term and `f` together, so it
# moves absolute times, not which batch is faster.
HBM_EFFICIENCY = 0.81
# Achievable fraction of peak BF16 FLOPS for large dense GEMMs: Llama 3 pre-training on H100
# reached 38-43% BF16 MFU (Llama Team, "The Llama 3 Herd of Models", arXiv 2407.21783, Table 4).
# Used for prefill (compute bound) and the small per-token decode compute term.
MFU = 0.40
# The paper's measured curve: one MoE layer of Qwen3-30B-A3B at batch 64 is 4.7x slower with 128
# active experts than with 16 (ELDR, arXiv 2607.00466; see ../shared/DESIGN.md).
PAPER_SLOWDOWN = 4.7
PAPER_LOW_EXPERTS = 16
PAPER_HIGH_EXPERTS = 128
PAPER_BATCH = 64

BF16_BYTES = 2.0
# GPT-OSS stores routed-expert weights in MXFP4: 4-bit E2M1 values plus one 8-bit E8M0 scale per
# block of 32 (OCP Microscaling Formats v1.0; OpenAI gpt-oss model card), i.e. 4.25 bits/param.
MXFP4_BYTES = (4 + 8 / 32) / 8


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The published config.json numbers the cost model needs (per model, cited in the table)."""

    hidden_size: int
    expert_intermediate: int       # moe_intermediate_size (per routed expert)
    expert_bytes_per_param: float  # bf16 unless the checkpoint says otherwise
    num_moe_layers: int
    num_experts: int
    top_k: int
    dense_params_read_per_step: float   # non-expert weights every decode step streams
    active_params_per_token: float      # for FLOPs: 2 * active params per token
    kv_bytes_per_token: float           # all layers, K and V (or MLA latent), bf16
    sliding_window: int | None = None   # window of the sliding-attention layers, if any
    sliding_layer_fraction: float = 0.0

    @property
    def expert_bytes(self) -> float:
        # gate_proj, up_proj, down_proj: three hidden x intermediate matrices per expert.
        return 3 * self.hidden_size * self.expert_intermediate * self.expert_bytes_per_param


def _qwen3_30b_a3b() -> ModelSpec:
    # Qwen/Qwen3-30B-A3B config.json: hidden_size 2048, moe_intermediate_size 768, 48 layers,
    # 128 experts, top-8, 32 attention heads, 4 KV heads, head_dim 128, vocab 151936,
    # tie_word_embeddings false.
    h, layers, heads, kv_heads, head_dim, vocab = 2048, 48, 32, 4, 128, 151936
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2   # q,o + k,v projections
    router = h * 128
    lm_head = vocab * h
    dense = layers * (attn + router) + lm_head
    experts_active = layers * 8 * 3 * h * 768
    return ModelSpec(
        hidden_size=h, expert_intermediate=768, expert_bytes_per_param=BF16_BYTES,
        num_moe_layers=layers, num_experts=128, top_k=8,
        dense_params_read_per_step=dense,
        active_params_per_token=dense + experts_active,
        kv_bytes_per_token=layers * 2 * kv_heads * head_dim * BF16_BYTES,
    )


def _gpt_oss_120b() -> ModelSpec:
    # openai/gpt-oss-120b config.json: hidden_size 2880, intermediate_size 2880 (per expert),
    # 36 layers, 128 local experts, 4 per token, 64 attention heads, 8 KV heads, head_dim 64,
    # vocab 201088, sliding_window 128 on every other layer (layer_types alternate).
    h, layers, heads, kv_heads, head_dim, vocab = 2880, 36, 64, 8, 64, 201088
    attn = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    router = h * 128
    lm_head = vocab * h
    dense = layers * (attn + router) + lm_head
    experts_active = layers * 4 * 3 * h * 2880
    return ModelSpec(
        hidden_size=h, expert_intermediate=2880, expert_bytes_per_param=MXFP4_BYTES,
        num_moe_layers=layers, num_experts=128, top_k=4,
        dense_params_read_per_step=dense,
        active_params_per_token=dense + experts_active,
        kv_bytes_per_token=layers * 2 * kv_heads * head_dim * BF16_BYTES,
        sliding_window=128, sliding_layer_fraction=0.5,
    )


def _deepseek_v2_lite() -> ModelSpec:
    # deepseek-ai/DeepSeek-V2-Lite config.json: hidden_size 2048, moe_intermediate_size 1408,
    # 27 layers with first_k_dense_replace 1 (layer 0 dense, intermediate_size 10944), 64 routed
    # + 2 shared experts, top-6, MLA with kv_lora_rank 512, qk_rope_head_dim 64,
    # qk_nope_head_dim 128, v_head_dim 128, 16 heads, q_lora_rank null, vocab 102400.
    h, layers, moe_layers, heads, vocab = 2048, 27, 26, 16, 102400
    attn = (h * heads * (128 + 64)          # q_proj
            + h * (512 + 64)                # kv_a_proj_with_mqa
            + 512 * heads * (128 + 128)     # kv_b_proj
            + heads * 128 * h)              # o_proj
    shared_experts = 2 * 3 * h * 1408       # always active: streamed every step like dense
    dense_mlp = 3 * h * 10944
    router = h * 64
    lm_head = vocab * h
    dense = layers * attn + moe_layers * (shared_experts + router) + dense_mlp + lm_head
    experts_active = moe_layers * 6 * 3 * h * 1408
    return ModelSpec(
        hidden_size=h, expert_intermediate=1408, expert_bytes_per_param=BF16_BYTES,
        num_moe_layers=moe_layers, num_experts=64, top_k=6,
        dense_params_read_per_step=dense,
        active_params_per_token=dense + experts_active,
        # MLA caches one compressed latent (512) plus the rope key (64) per layer per token.
        kv_bytes_per_token=layers * (512 + 64) * BF16_BYTES,
    )


MODEL_SPECS: dict[str, ModelSpec] = {
    "Qwen3-30B-A3B": _qwen3_30b_a3b(),
    "GPT-OSS-120B": _gpt_oss_120b(),
    "DeepSeek-V2-Lite": _deepseek_v2_lite(),
}


def model_spec(geometry: ModelGeometry) -> ModelSpec:
    """The spec for a known geometry; checks the geometry matches the published config."""
    spec = next((s for n, s in MODEL_SPECS.items() if n.lower() == geometry.name.lower()), None)
    if spec is None:
        known = ", ".join(sorted(MODEL_SPECS))
        raise ValueError(f"no cost model for geometry.name {geometry.name!r}; known: {known}")
    shape = (spec.num_moe_layers, spec.num_experts, spec.top_k)
    if (geometry.num_layers, geometry.num_experts, geometry.top_k) != shape:
        raise ValueError(
            f"geometry {geometry.name!r} is [{geometry.num_layers}, {geometry.num_experts}, "
            f"top-{geometry.top_k}] but the published config is {list(shape)}"
        )
    return spec


def fixed_overhead_from_curve(expert_seconds: float, token_seconds: float) -> float:
    """Per-MoE-layer fixed time such that the layer is PAPER_SLOWDOWN x slower at 128 experts.

    Solves (f + B*p + hi*x) / (f + B*p + lo*x) = r for f, with x the time to stream one
    expert, p the per-token compute time, B the paper's batch.
    """
    r, lo, hi = PAPER_SLOWDOWN, PAPER_LOW_EXPERTS, PAPER_HIGH_EXPERTS
    fixed = (hi - r * lo) * expert_seconds / (r - 1) - PAPER_BATCH * token_seconds
    if fixed < 0:
        raise ValueError("per-token compute alone exceeds the paper's curve; check the constants")
    return fixed


@dataclass(frozen=True, slots=True)
class CostModel:
    """Durations in seconds; all fields already include `time_scale`."""

    name: str
    num_moe_layers: int
    expert_seconds: float          # stream one expert's weights once
    moe_layer_fixed_seconds: float
    token_layer_seconds: float     # per-token compute in one MoE layer
    dense_seconds: float           # non-expert weights, every step
    kv_seconds_per_token: float
    prefill_seconds_per_token: float
    sliding_window: int | None = None
    sliding_layer_fraction: float = 0.0
    time_scale: float = 1.0

    @classmethod
    def for_geometry(cls, geometry: ModelGeometry, *, time_scale: float = 1.0) -> CostModel:
        _check_time_scale(time_scale)
        spec = model_spec(geometry)
        bandwidth = H100_SXM_HBM_BYTES_PER_S * HBM_EFFICIENCY
        flops = H100_SXM_BF16_DENSE_FLOPS * MFU
        expert_s = spec.expert_bytes / bandwidth
        # 2 FLOPs per multiply-add; per token, all its active params, spread over the MoE layers.
        token_layer_s = 2 * spec.active_params_per_token / flops / spec.num_moe_layers
        fixed = fixed_overhead_from_curve(expert_s, token_layer_s)
        base = cls(
            name=geometry.name,
            num_moe_layers=spec.num_moe_layers,
            expert_seconds=expert_s,
            moe_layer_fixed_seconds=fixed,
            token_layer_seconds=token_layer_s,
            dense_seconds=spec.dense_params_read_per_step * BF16_BYTES / bandwidth,
            kv_seconds_per_token=spec.kv_bytes_per_token / bandwidth,
            prefill_seconds_per_token=2 * spec.active_params_per_token / flops,
            sliding_window=spec.sliding_window,
            sliding_layer_fraction=spec.sliding_layer_fraction,
        )
        return base.scaled(time_scale)

    @classmethod
    def instant(cls) -> CostModel:
        """Every duration zero: for benchmarking the proxy itself, not the model."""
        return cls("instant", 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def fixed(cls, step_seconds: float, geometry: ModelGeometry, *,
              prefill_seconds_per_token: float = 0.0) -> CostModel:
        """Every decode step takes `step_seconds` regardless of batch or experts (for tests)."""
        if step_seconds < 0 or prefill_seconds_per_token < 0:
            raise ValueError("step_seconds and prefill_seconds_per_token must be >= 0")
        return cls("fixed", geometry.num_layers, 0.0, step_seconds / geometry.num_layers,
                   0.0, 0.0, 0.0, prefill_seconds_per_token)

    def scaled(self, time_scale: float) -> CostModel:
        """The same model with every duration multiplied by `time_scale`."""
        _check_time_scale(time_scale)
        f = time_scale
        return replace(
            self,
            expert_seconds=self.expert_seconds * f,
            moe_layer_fixed_seconds=self.moe_layer_fixed_seconds * f,
            token_layer_seconds=self.token_layer_seconds * f,
            dense_seconds=self.dense_seconds * f,
            kv_seconds_per_token=self.kv_seconds_per_token * f,
            prefill_seconds_per_token=self.prefill_seconds_per_token * f,
            time_scale=self.time_scale * f,
        )

    def moe_layer_seconds(self, batch_size: int, distinct_experts: float) -> float:
        """One MoE layer: fixed overhead + stream each distinct expert + per-token compute."""
        return (self.moe_layer_fixed_seconds + distinct_experts * self.expert_seconds
                + batch_size * self.token_layer_seconds)

    def decode_step_seconds(self, batch_size: int, distinct_experts_per_layer: npt.ArrayLike,
                            kv_tokens: int) -> float:
        """One decode step of one attention rank (no DP attention)."""
        return self.dp_decode_step_seconds([(batch_size, kv_tokens)], distinct_experts_per_layer)

    def dp_decode_step_seconds(self, ranks: Sequence[tuple[int, int]],
                               distinct_experts_per_layer: npt.ArrayLike) -> float:
        """One decode step of a DP-attention worker: `ranks` is (batch, kv_tokens) per rank.

        SGLang's DP attention runs one forward per iteration across every rank (a rank with no
        requests runs an IDLE batch so the MoE collectives line up: sglang 0.5.23
        `managers/scheduler_components/dp_attn.py` `prepare_mlp_sync_batch_raw`). Attention
        (here: the KV reads) runs on each rank in parallel, so the step waits for the slowest
        rank; the MoE layers serve the gathered tokens of all ranks, so each streams the union
        of the experts any rank's tokens routed to, once, and computes every rank's tokens.
        `distinct_experts_per_layer` must therefore count the union over all ranks. The
        dense weights are read once per step (each rank reads its own copy in parallel). With
        one rank this is exactly the single-rank formula (docs/emulator-cost-model.md s. 9).
        """
        if not ranks:
            raise ValueError("ranks must not be empty")
        for batch_size, kv_tokens in ranks:
            if batch_size < 0:
                raise ValueError(f"batch_size must be >= 0, got {batch_size}")
            if kv_tokens < 0:
                raise ValueError(f"kv_tokens must be >= 0, got {kv_tokens}")
        total_batch = sum(b for b, _ in ranks)
        if total_batch == 0:
            return 0.0
        distinct = np.asarray(distinct_experts_per_layer, dtype=np.float64)
        if distinct.ndim != 1 or (self.num_moe_layers and distinct.shape[0] != self.num_moe_layers):
            raise ValueError(
                f"distinct_experts_per_layer must have shape [{self.num_moe_layers}], "
                f"got {distinct.shape}"
            )
        moe = (distinct.size * (self.moe_layer_fixed_seconds
                                + total_batch * self.token_layer_seconds)
               + float(distinct.sum()) * self.expert_seconds)
        attention = max(self.kv_read_seconds(b, kv) for b, kv in ranks)
        return moe + self.dense_seconds + attention

    def kv_read_seconds(self, batch_size: int, kv_tokens: int) -> float:
        """Attention reads every cached token once; sliding-window layers at most the window."""
        full = kv_tokens * (1.0 - self.sliding_layer_fraction)
        windowed = 0.0
        if self.sliding_window is not None:
            # Aggregate approximation: each request reads at most `sliding_window` tokens there.
            windowed = (min(kv_tokens, batch_size * self.sliding_window)
                        * self.sliding_layer_fraction)
        return (full + windowed) * self.kv_seconds_per_token

    def prefill_seconds(self, num_tokens: int) -> float:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return num_tokens * self.prefill_seconds_per_token


def _check_time_scale(time_scale: float) -> None:
    if not isinstance(time_scale, (int, float)) or not np.isfinite(time_scale) or time_scale <= 0:
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
