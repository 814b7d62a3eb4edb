"""Expert routing sources: which top-k experts each token uses in each MoE layer.

Two sources, both deterministic (same prompt + seed -> same experts):

`token-hash` (any known geometry): a stand-in for a trained router over real text. Real MoE
routing is driven by token identity, so each token id gets a seeded random embedding; and a
real hidden state also carries what the document is about, so the router's hidden state mixes
that embedding with a little short context (an exponential moving average of the previous
embeddings) and with the request's topic (the direction of the mean of ALL its earlier
embeddings, carried from the prompt into the decode), mostly the topic its first few tokens
set (its instruction: in real routing the requests of one task route as alike as the tokens of
one request). Real tokens of one request also route far less alike than a shared topic alone
makes them, so each token occurrence adds its own seeded noise vector (keyed by a hash of the
request's prefix up to that token: the same text still routes the same way, and a shared
prefix routes identically). Each layer has its own seeded random projection from hidden state
to expert logits, of which the top-k win. Text from one domain shares vocabulary and topic,
hence shares experts. The weights are fitted together on routing statistics of the real trace
at the trace's geometry (benchmarks/routing_stats.py --fit; see TOPIC_MIX). Decode tokens
continue the same text: a seeded walk over the bigrams of the prompt's own tokens, so the
output stays in-domain and its experts correlate with the prompt's; and, as a real answer routes
less like its prompt than the prompt routes like itself, each output token's hidden state adds a
direction of its task (ANSWER_SHIFT_MIX). Measured: benchmarks/routing_stats.py,
benchmarks/emulator_locality.py.

`trace`: replays real routing recorded from DeepSeek-V2-Lite on the ESFT task data
(../shared/data/esft_routing_shared.npz, see ../shared/DESIGN.md). The prompt selects a trace
request with a `[trace:N]` marker in its text, else by a stable hash of its text (or of its
token ids when there is no text). The trace has no prefill/decode boundary (prompts were
teacher-forced with their answers), so its leading `prefill_fraction` (default 0.5) of tokens
plays the prompt and the rest the decode. Prompt rows are that prefill part cycled to the real
prompt length; decode rows cycle through the decode part. Token ids still come from the prompt
bigram walk, so decode text is plausible; only the experts come from the trace.

Threads: `route_prompt` may run in a worker thread while the event loop pulls continuations.
The only shared mutable state is the token-hash embedding cache, which holds deterministic
values: a race at worst computes an embedding twice (the noise table and core are read-only).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import KNOWN_GEOMETRIES, ModelGeometry

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]

ROUTING_SOURCES = ("token-hash", "trace")
TRACE_PATH_ENV = "ELDR_TRACE_PATH"
TRACE_FILE_NAME = "esft_routing_shared.npz"
_TRACE_MARKER = re.compile(r"\[trace:(\d+)\]")

# Width of the token embedding: enough for near-orthogonal random directions between distinct
# tokens (|cos| ~ 1/sqrt(64) = 0.125), small enough that routing a 1k-token prompt on the
# 48x128 Qwen3 geometry is one [1000, 64] x [64, 6144] matrix product.
EMBED_DIM = 64
# Local part of the hidden state = (1 - CONTEXT_MIX) * token embedding + CONTEXT_MIX * short
# context. 0.25 keeps token identity dominant over the neighbours (as in real routers, where the
# same token mostly picks the same experts). Chosen before measuring, not tuned.
CONTEXT_MIX = 0.25
# The running context is an exponential moving average with this decay per token, so it
# summarises roughly the last 1 / (1 - 0.8) = 5 tokens.
CONTEXT_DECAY = 0.8
# The weights of the hidden state (TokenHashRouting._hidden):
#   hidden = (1 - TOPIC_MIX) * local
#            + TOPIC_MIX * ((1 - TOPIC_OPENING_SHARE) * topic + TOPIC_OPENING_SHARE * opening)
#            + TOKEN_NOISE_MIX * noise + CORE_MIX * core
# local: the token's embedding + short context; topic: unit direction of the mean of all the
# request's earlier token embeddings (what the text is about); opening: the same over its first
# TOPIC_OPENING_TOKENS tokens only (its instruction: which task it is); noise: a unit vector per
# token occurrence (variation the tokens of one request do not share); core: one fixed unit
# vector per router (experts every request favours). All unit vectors, so the weights are
# scale-free: the same values apply to any (layers, experts, top-k).
# FITTED TOGETHER, not chosen: `python benchmarks/routing_stats.py --fit --seeds 0,1,2`
# routes length-matched twins of the 108 real ESFT trace requests (prompts from
# loadtest.workloads, decode from the emulator's own continuation) on the trace's geometry,
# DeepSeek-V2-Lite (26 layers, 64 experts, top-6), and keeps the grid point with the least mean
# squared relative error against the trace over its 13 routing statistics (token-pair overlap,
# signature and prefill-vs-decode cosines for the same request / same domain / other domain,
# distinct experts of 16-request batches, busiest-1/8 load share).
# 2026-12-02 (grid topic 0.2-0.5, opening share 0.6-1 of 6 or 8 tokens, noise 0.3-0.8, core 0
# or 0.1): 0.3 / 0.9 of 6 / 0.4 / 0, loss 0.0073, 11 of 13 within 15%; output tokens routed too
# much like their prompt (prefill-vs-decode cosine same request +17%, same domain +19%) because
# the decode walk reuses the prompt's words. Any core made it worse (0.1: 0.0087).
# 2026-12-03, with the answer shift (ANSWER_SHIFT_MIX; grid: the script's default, 144 points,
# 4 min): topic 0.25, opening share 1 of 6 tokens, noise 0.5, core 0, shift 0.35; loss 0.0012,
# 13 of 13 within 15% (worst: other-request same-domain signature cosine -7%). Neighbours (noise
# 0.45 with shift 0.3, share 0.9) are within 0.0004. Before any of this (topic 0.7 over the
# whole request, no opening, no noise): two tokens of one request shared 55% of their experts vs
# the trace's 16%, other-domain signature cosine 0.25 vs 0.58. Qwen3-30B-A3B and GPT-OSS-120B
# use these values untuned: that real routing on those models has the same mix is an
# assumption (no trace to fit them on). docs/emulator-cost-model.md section 4.
TOPIC_MIX = 0.25
TOPIC_OPENING_SHARE = 1.0
TOPIC_OPENING_TOKENS = 6
TOKEN_NOISE_MIX = 0.5
CORE_MIX = 0.0
# Output tokens add ANSWER_SHIFT_MIX x a unit direction of their task (`answer_shift`, keyed by
# the prompt's first TOPIC_OPENING_TOKENS tokens). On the trace a request's second half routes
# less like its first half than two random halves do (signature cosine 0.735 vs 0.897): an
# answer is not its prompt re-read. The walk over the prompt's words cannot show that; a
# shared answer direction per task can, and keeps requests of one task alike in their answers.
# Tried first and dropped: output words from a per-task answer vocabulary (a share of 0.2-0.5
# of the output from 64-1,024 words) made the fit worse (loss 0.0084-0.0094): more varied words
# smooth the expert counts, raising every cosine. Fitted above.
ANSWER_SHIFT_MIX = 0.35
# Unit noise vectors drawn once per router; a token occurrence picks one by a hash of the
# request's whole prefix up to and including it (two occurrences share one with probability
# 1/4096, negligible next to the 6/64-or-less chance overlap of experts; 1 MiB per router).
_NOISE_INDEX_BITS = 12
_NOISE_TABLE_SIZE = 1 << _NOISE_INDEX_BITS
# 64-bit FNV-1a over token ids for the prefix hash, then a multiplicative mix for the index.
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1
_INDEX_MIX = 0x9E3779B97F4A7C15
# Decode continuation: tokens generated per batch of routing work (amortises the matmul).
_CONTINUATION_CHUNK = 32
# Rows of [T * L, E] logits per top-k block: 2048 x 128 float32 = 1 MiB, cache-sized.
_TOP_K_BLOCK_ROWS = 2048
# A walk that reaches a token with no successor ends the text (EOS) only once it has produced
# this many tokens; before that it restarts at a random prompt position (short prompts would
# otherwise often stop at their first token).
MIN_TOKENS_BEFORE_EOS = 16


class RoutingError(ValueError):
    """Bad routing configuration or input (the message names the field)."""


class RoutingSource(Protocol):
    geometry: ModelGeometry

    def route_prompt(self, prompt_ids: Sequence[int], text: str | None) -> IntArray: ...

    def continuation(self, prompt_ids: Sequence[int], text: str | None, seed: int
                     ) -> Iterator[tuple[int, IntArray]]: ...


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _ids_key(prompt_ids: Sequence[int]) -> bytes:
    return np.asarray(prompt_ids, dtype="<i8").tobytes()


class BigramWalk:
    """Endless deterministic continuation over the bigrams of a prompt's own tokens."""

    def __init__(self, prompt_ids: Sequence[int], seed: int, eos_token_id: int | None) -> None:
        self._ids = [int(t) for t in prompt_ids]
        self._eos = eos_token_id
        successors: dict[int, list[int]] = {}
        for a, b in zip(self._ids, self._ids[1:], strict=False):
            successors.setdefault(a, []).append(b)
        self._successors = successors
        self._rng = np.random.default_rng([seed & 0xFFFFFFFF, stable_hash(_ids_key(self._ids))])
        self._current = self._ids[-1] if self._ids else None
        self._produced = 0

    def next_token(self) -> int:
        if not self._ids:
            # No prompt to continue (e.g. empty input_ids): end at once if the model has an EOS.
            return self._eos if self._eos is not None else 0
        options = self._successors.get(self._current) if self._current is not None else None
        if options:
            token = options[int(self._rng.integers(len(options)))]
        elif self._eos is not None and self._produced >= MIN_TOKENS_BEFORE_EOS:
            token = self._eos
        else:
            token = self._ids[int(self._rng.integers(len(self._ids)))]
        self._current = token
        self._produced += 1
        return token


@dataclass(frozen=True)
class _ContextState:
    """What the router carries from one token to the next (prompt -> decode included)."""

    short: FloatArray        # exponential moving average of earlier embeddings
    topic_sum: FloatArray    # sum of all earlier embeddings of the request
    prefix_hash: int = _FNV_OFFSET   # FNV-1a of all earlier token ids (keys the token noise)
    position: int = 0                # tokens seen so far
    opening_sum: FloatArray | None = None   # sum of the embeddings of the opening tokens seen

    @classmethod
    def empty(cls) -> _ContextState:
        return cls(np.zeros(EMBED_DIM, dtype=np.float32), np.zeros(EMBED_DIM, dtype=np.float32))


def prefix_hashes(token_ids: Sequence[int], start: int = _FNV_OFFSET) -> list[int]:
    """FNV-1a (64-bit) over token ids: element i hashes `start`'s prefix + token_ids[: i + 1]."""
    out = []
    h = start
    for tid in token_ids:
        h = ((h ^ (int(tid) & _MASK64)) * _FNV_PRIME) & _MASK64
        out.append(h)
    return out


def _unit_rows(rows: FloatArray) -> FloatArray:
    """Each row scaled to unit length; rows of (near) zero length stay zero."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 1e-6)


def noise_index(prefix_hash: int) -> int:
    """Row of the noise table a token with this prefix hash uses (top 12 bits of a mix)."""
    return ((prefix_hash * _INDEX_MIX) & _MASK64) >> (64 - _NOISE_INDEX_BITS)


class RouterParts(NamedTuple):
    """The weight-free rows `TokenHashRouting.mix` combines into hidden states."""

    local: FloatArray     # (1 - context_mix) * embedding + context_mix * short context
    topic: FloatArray     # unit direction of the sum of all earlier embeddings
    opening: FloatArray   # unit direction of the sum of the earlier opening-token embeddings
    noise: FloatArray     # the token occurrence's unit noise vector


class TokenHashRouting:
    """Seeded random-projection router over token embeddings (see module docstring)."""

    def __init__(self, geometry: ModelGeometry, tokenizer: Tokenizer, *, seed: int = 0,
                 context_mix: float = CONTEXT_MIX, context_decay: float = CONTEXT_DECAY,
                 topic_mix: float = TOPIC_MIX, opening_share: float = TOPIC_OPENING_SHARE,
                 opening_tokens: int = TOPIC_OPENING_TOKENS,
                 token_noise_mix: float = TOKEN_NOISE_MIX, core_mix: float = CORE_MIX,
                 answer_shift_mix: float = ANSWER_SHIFT_MIX) -> None:
        for name, value in (("context_mix", context_mix), ("context_decay", context_decay),
                            ("topic_mix", topic_mix)):
            if not 0.0 <= value < 1.0:
                raise RoutingError(f"{name} must be in [0, 1), got {value!r}")
        if not 0.0 <= opening_share <= 1.0:
            raise RoutingError(f"opening_share must be in [0, 1], got {opening_share!r}")
        if not (isinstance(opening_tokens, int) and opening_tokens >= 1):
            raise RoutingError(f"opening_tokens must be an integer >= 1, got {opening_tokens!r}")
        for name, value in (("token_noise_mix", token_noise_mix), ("core_mix", core_mix),
                            ("answer_shift_mix", answer_shift_mix)):
            if not 0.0 <= value <= 100.0:   # weights relative to unit vectors; any >= 0 works
                raise RoutingError(f"{name} must be in [0, 100], got {value!r}")
        self.topic_mix = topic_mix
        self.opening_share = opening_share
        self.opening_tokens = opening_tokens
        self.token_noise_mix = token_noise_mix
        self.core_mix = core_mix
        self.answer_shift_mix = answer_shift_mix
        self.context_mix = context_mix
        self.context_decay = context_decay
        self.geometry = geometry
        self.tokenizer = tokenizer
        self.seed = seed
        rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x70A3])
        # One projection per layer, stored as [EMBED_DIM, L * E] for a single matmul per batch.
        self._projection = rng.standard_normal(
            (EMBED_DIM, geometry.num_layers * geometry.num_experts), dtype=np.float32)
        self._embeddings: dict[int, FloatArray] = {}   # bounded by the tokenizer's vocab
        # Own rng stream, so adding them left the projection and embeddings unchanged.
        noise_rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x4015E])
        table = noise_rng.standard_normal((_NOISE_TABLE_SIZE, EMBED_DIM), dtype=np.float32)
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        self._noise_table = table
        core = noise_rng.standard_normal(EMBED_DIM, dtype=np.float32)
        self._core = core / np.linalg.norm(core)

    def answer_shift(self, prompt_ids: Sequence[int]) -> FloatArray:
        """The unit direction output tokens of this prompt's task add (ANSWER_SHIFT_MIX): one
        per task, keyed like the opening topic by the prompt's first tokens."""
        key = stable_hash(_ids_key(prompt_ids[: self.opening_tokens]))
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xA45, key])
        vec = rng.standard_normal(EMBED_DIM, dtype=np.float32)
        return vec / np.linalg.norm(vec)

    def embedding(self, token_id: int) -> FloatArray:
        vec = self._embeddings.get(token_id)
        if vec is None:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xE4B, int(token_id)])
            vec = rng.standard_normal(EMBED_DIM, dtype=np.float32)
            vec /= np.linalg.norm(vec)
            self._embeddings[token_id] = vec
        return vec

    def _hidden(self, token_ids: Sequence[int], state: _ContextState
                ) -> tuple[FloatArray, _ContextState]:
        """Hidden states for consecutive tokens, carrying the running context along.

        hidden = (1 - topic_mix) * local
                 + topic_mix * ((1 - opening_share) * topic + opening_share * opening)
                 + token_noise_mix * noise + core_mix * core, where
        local = (1 - context_mix) * embedding + context_mix * short EMA of earlier embeddings,
        topic = unit direction of the mean of ALL earlier embeddings of the request (zero before
        the first token), opening = the same over the request's first `opening_tokens` tokens
        only (its instruction or system prompt: what task the request is, shared by the
        requests of one task), noise = a unit vector of the router's noise table picked by a hash of
        the request's prefix up to and including this token (per-token variation that tokens of
        one request do not share; the same text still routes the same way) and core = one fixed
        unit vector per router (through each layer's projection, a fixed Gaussian bias on that
        layer's expert logits: the experts every request favours). Both context terms see only
        earlier tokens, as a causal model does.

        Vectorised over tokens except for the EMA recurrence ctx[i+1] = decay * ctx[i] +
        (1 - decay) * emb[i], which stays a loop of two in-place float32 ufuncs per token: the
        same operations on the same values as the one-token-at-a-time definition (kept in
        tests/emulator/test_routing_vectorised.py), so the results are bit-identical. A closed
        form (scipy.signal.lfilter, cumulative sums of decay powers) would round differently and
        could flip near-tied top-k choices.
        """
        parts, new_state = self._parts(token_ids, state)
        return self.mix(parts, self.topic_mix, self.opening_share, self.token_noise_mix,
                        self.core_mix), new_state

    def mix(self, parts: RouterParts, topic_mix: float, opening_share: float,
            token_noise_mix: float, core_mix: float) -> FloatArray:
        """Combine `_parts` into hidden states (in place on `parts.local`; the weights are
        explicit so that benchmarks/routing_stats.py --fit can try others on the same parts)."""
        local = parts.local
        if len(local):
            if topic_mix > 0.0:
                topic = parts.topic
                if opening_share > 0.0:
                    topic = (1.0 - opening_share) * topic + opening_share * parts.opening
                local *= 1.0 - topic_mix
                local += topic_mix * topic
            if token_noise_mix > 0.0:
                local += token_noise_mix * parts.noise
            if core_mix > 0.0:
                local += core_mix * self._core
        return local

    def _parts(self, token_ids: Sequence[int], state: _ContextState
               ) -> tuple[RouterParts, _ContextState]:
        """The rows of `_hidden`'s formula before weighting, and the state after the tokens."""
        n = len(token_ids)
        embedding = self.embedding
        embs = (np.stack([embedding(int(tid)) for tid in token_ids]) if n
                else np.empty((0, EMBED_DIM), dtype=np.float32))
        mix, decay = self.context_mix, self.context_decay
        drive = (1.0 - decay) * embs
        ctxs = np.empty((n + 1, EMBED_DIM), dtype=np.float32)   # ctxs[i]: context before token i
        ctxs[0] = state.short
        keep = np.float32(decay)   # what `decay * ctx` casts the Python float to (NEP 50)
        multiply, add = np.multiply, np.add
        for i in range(n):
            nxt = ctxs[i + 1]
            multiply(ctxs[i], keep, out=nxt)
            add(nxt, drive[i], out=nxt)
        local = (1.0 - mix) * embs + mix * ctxs[:n]
        # Sum of the embeddings BEFORE each token: carried sum + exclusive prefix sum.
        sums = np.cumsum(embs, axis=0)
        total = state.topic_sum + (sums[-1] if n else 0.0)
        before = state.topic_sum + sums - embs
        topic = _unit_rows(before)
        # The same over the opening tokens only (positions < opening_tokens).
        opening_sum = (state.opening_sum if state.opening_sum is not None
                       else np.zeros(EMBED_DIM, dtype=np.float32))
        in_opening = max(0, min(n, self.opening_tokens - state.position))
        open_sums = np.cumsum(embs[:in_opening], axis=0)
        open_before = np.empty_like(before)
        open_before[:in_opening] = opening_sum + open_sums - embs[:in_opening]
        open_total = opening_sum + (open_sums[-1] if in_opening else 0.0)
        open_before[in_opening:] = open_total
        opening = _unit_rows(open_before)
        hashes = prefix_hashes(token_ids, state.prefix_hash)
        noise = self._noise_table[[noise_index(h) for h in hashes]]
        new_state = _ContextState(ctxs[n].copy(), total.astype(np.float32),
                                  hashes[-1] if n else state.prefix_hash, state.position + n,
                                  np.asarray(open_total, dtype=np.float32))
        return RouterParts(local, topic, opening, noise), new_state

    def _top_k(self, hidden: FloatArray) -> IntArray:
        g = self.geometry
        logits = (hidden @ self._projection).reshape(-1, g.num_experts)   # [T * L, E]
        # k rounds of argmax-and-mask (the first index wins a tie, as np.argmax does): ~3x
        # faster than argpartition over many short rows, and top_k is small (4-8). Done on
        # blocks of rows that stay in cache across the k rounds (2x faster than whole-array
        # rounds for a 1k-token prompt on [T, 48, 128]); rows are independent, so the result is
        # the same.
        top = np.empty((len(logits), g.top_k), dtype=np.int32)
        for start in range(0, len(logits), _TOP_K_BLOCK_ROWS):
            block = logits[start:start + _TOP_K_BLOCK_ROWS]   # a view: masked in place
            flat = block.reshape(-1)
            row_base = np.arange(len(block)) * g.num_experts
            out = top[start:start + _TOP_K_BLOCK_ROWS]
            for k in range(g.top_k):
                best = block.argmax(axis=1)
                out[:, k] = best
                flat[row_base + best] = -np.inf
        return top.reshape(len(hidden), g.num_layers, g.top_k)

    def route_prompt(self, prompt_ids: Sequence[int], text: str | None) -> IntArray:
        hidden, _ = self._hidden(prompt_ids, _ContextState.empty())
        return self._top_k(hidden)

    def continuation(self, prompt_ids: Sequence[int], text: str | None, seed: int
                     ) -> Iterator[tuple[int, IntArray]]:
        _, context = self._hidden(prompt_ids, _ContextState.empty())
        walk = BigramWalk(prompt_ids, seed, self.tokenizer.eos_token_id)
        shift = (self.answer_shift_mix * self.answer_shift(prompt_ids)
                 if self.answer_shift_mix > 0.0 else None)
        while True:
            chunk = [walk.next_token() for _ in range(_CONTINUATION_CHUNK)]
            hidden, context = self._hidden(chunk, context)
            if shift is not None:
                hidden += shift
            experts = self._top_k(hidden)
            for i, token in enumerate(chunk):
                yield token, experts[i]


class RoutingTrace:
    """The recorded ESFT routing data, loaded once (pure data, no I/O after construction)."""

    def __init__(self, expert_ids: npt.NDArray[np.integer], offsets: npt.NDArray[np.integer],
                 domains: Sequence[str], geometry: ModelGeometry) -> None:
        self.expert_ids = expert_ids
        self.offsets = offsets
        self.domains = list(domains)
        self.geometry = geometry

    @property
    def num_requests(self) -> int:
        return len(self.offsets) - 1

    def request(self, index: int) -> npt.NDArray[np.integer]:
        return self.expert_ids[self.offsets[index]: self.offsets[index + 1]]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        p = Path(path)
        if not p.is_file():
            raise RoutingError(f"trace_path {str(p)!r} does not exist (set {TRACE_PATH_ENV})")
        with np.load(p, allow_pickle=False) as data:
            missing = {"expert_ids", "seq_offsets", "domain"} - set(data.files)
            if missing:
                raise RoutingError(f"trace file {p} lacks array(s): {', '.join(sorted(missing))}")
            ids = data["expert_ids"]
            offsets = data["seq_offsets"].astype(np.int64)
            domains = [str(d) for d in data["domain"]]
            if ids.ndim != 3:
                raise RoutingError(
                    f"trace expert_ids must be [tokens, layers, top_k], got {ids.shape}")
            num_experts = (int(data["num_experts"]) if "num_experts" in data.files
                           else int(ids.max()) + 1)
        geometry = _trace_geometry(ids.shape[1], num_experts, ids.shape[2])
        if offsets[0] != 0 or offsets[-1] != len(ids) or np.any(np.diff(offsets) < 2):
            raise RoutingError(
                "trace seq_offsets must rise from 0 to len(expert_ids), >= 2 tokens each")
        if len(domains) != len(offsets) - 1:
            raise RoutingError("trace domain must have one entry per request")
        return cls(ids, offsets, domains, geometry)


def _trace_geometry(num_layers: int, num_experts: int, top_k: int) -> ModelGeometry:
    for g in KNOWN_GEOMETRIES.values():
        if (g.num_layers, g.num_experts, g.top_k) == (num_layers, num_experts, top_k):
            return g
    return ModelGeometry("trace", num_layers, num_experts, top_k)


def default_trace_path() -> Path:
    """$ELDR_TRACE_PATH, else ../shared/data/esft_routing_shared.npz next to the repo root."""
    env = os.environ.get(TRACE_PATH_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / TRACE_FILE_NAME


class TraceRouting:
    """Replays recorded routing; see the module docstring for how requests are chosen."""

    def __init__(self, trace: RoutingTrace, tokenizer: Tokenizer, *,
                 prefill_fraction: float = 0.5, seed: int = 0) -> None:
        if not 0.0 < prefill_fraction < 1.0:
            raise RoutingError(f"prefill_fraction must be in (0, 1), got {prefill_fraction!r}")
        self.trace = trace
        self.geometry = trace.geometry
        self.tokenizer = tokenizer
        self.prefill_fraction = prefill_fraction
        self.seed = seed

    def request_index(self, prompt_ids: Sequence[int], text: str | None) -> int:
        """`[trace:N]` in the text picks request N (mod count); else a stable hash of the prompt."""
        n = self.trace.num_requests
        if text is not None:
            match = _TRACE_MARKER.search(text)
            if match:
                return int(match.group(1)) % n
            return stable_hash(text.encode("utf-8")) % n
        return stable_hash(_ids_key(prompt_ids)) % n

    def split(self, index: int) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]:
        """(prefill rows, decode rows) of trace request `index`; both non-empty."""
        rows = self.trace.request(index)
        cut = min(max(1, int(len(rows) * self.prefill_fraction)), len(rows) - 1)
        return rows[:cut], rows[cut:]

    def route_prompt(self, prompt_ids: Sequence[int], text: str | None) -> IntArray:
        prefill, _ = self.split(self.request_index(prompt_ids, text))
        take = np.arange(len(prompt_ids)) % len(prefill)
        return prefill[take].astype(np.int32)

    def continuation(self, prompt_ids: Sequence[int], text: str | None, seed: int
                     ) -> Iterator[tuple[int, IntArray]]:
        _, decode = self.split(self.request_index(prompt_ids, text))
        rows = decode.astype(np.int32)
        walk = BigramWalk(prompt_ids, seed, self.tokenizer.eos_token_id)
        i = 0
        while True:
            yield walk.next_token(), rows[i % len(rows)]
            i += 1


def make_routing_source(name: str, geometry: ModelGeometry, tokenizer: Tokenizer, *,
                        seed: int = 0, trace_path: str | None = None,
                        prefill_fraction: float = 0.5) -> RoutingSource:
    """Build a routing source by name; "trace" ignores `geometry` and uses the trace's own."""
    if name == "token-hash":
        return TokenHashRouting(geometry, tokenizer, seed=seed)
    if name == "trace":
        trace = RoutingTrace.load(trace_path or default_trace_path())
        return TraceRouting(trace, tokenizer, prefill_fraction=prefill_fraction, seed=seed)
    raise RoutingError(f"routing must be one of {', '.join(ROUTING_SOURCES)}; got {name!r}")
