"""Signature cache: expert counts of earlier prompts (and their outputs), keyed by chained hashes of
prompt blocks, so a continued conversation is routed on observed routing instead of a guess.

The paper keeps one int8 row per KV block inside the engine; a gateway only sees what results
carry, which is coarser:
- a prefill-first result carries `prompt_expert_counts`: the SUM over all prompt tokens, no rows;
- a decode result with `return_routed_experts` carries rows for the OUTPUT tokens only (in PD mode
  the decode's prompt rows are not valid; DESIGN.md, "SGLang reality" 2).
Neither gives per-block counts inside the prompt, so entries hold *prefix* counts: the counts of
the whole sequence up to a learned end position (a prompt, or a prompt plus its output). That also
makes a lookup O(1) in the number of blocks summed (one entry), whatever the prompt length.

Keys. A sequence is bytes: token ids as little-endian uint32 when the request has `input_ids`,
else the UTF-8 text; blocks are `block_tokens` ids or `block_bytes` bytes. Chain hashes
`h_0 = H(kind)`, `h_{j+1} = H(h_j, block_j)` identify every block-aligned prefix. An entry for a
sequence of length `p = b*B + t` (t < B) is stored under `H(end, h_b, tail)` and its tail length
`t` is indexed under `h_b`. A lookup computes the chain hashes of the new prompt and, from the
longest aligned prefix down, checks the few tail lengths indexed there: the first match is the
longest learned prefix of the prompt. So when the next turn's prompt is `prompt + output + new
text`, the entry learned from the previous turn is found even though its end is not aligned.

H is Python's `hash()` of a tuple: SipHash with a per-process random key, 64-bit. The cache lives
in one process, so stable-across-processes digests are not needed; measured ~3x cheaper than
BLAKE2b per 256-byte block here; keyed, so clients cannot craft collisions; and an accidental one
among 10^5 entries has probability ~3e-10. A collision could only mislead one routing hint,
never change a response.

Coverage. A hit reports `covered` units (the learned sequence's length) of `total`, and
`observed` units: how many of the covered units the counts were actually observed for (all of
them after a prefill-first result; only the output tokens of each turn in the `dual` flow, where
prompt rows are never returned). `exact` = the whole prompt is covered and fully observed.
How partial hits are combined with the predictor is the resolver's business
(`gateway.eldr.resolver`).

Memory is bounded by `max_entries` and `max_bytes` (counts bytes + a fixed per-entry overhead),
evicting least-recently-used entries. Pure, synchronous, single-threaded (the event loop).
"""

from __future__ import annotations

import array
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from zones.geometry import ModelGeometry

IntArray = npt.NDArray[np.int32]
UnitKind = Literal["ids", "text"]

DEFAULT_BLOCK_TOKENS = 64
# ~4 bytes of English text per token, so text blocks cover about as much as token blocks.
DEFAULT_BLOCK_BYTES = 256
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Dict slot, key bytes, entry object and array header: measured ~300 bytes with sys.getsizeof;
# rounded up so the byte budget is an upper bound on what the cache holds.
ENTRY_OVERHEAD_BYTES = 512
# The array typecode of a 4-byte unsigned int ('I' on every mainstream platform, else 'L').
_U32 = "I" if array.array("I").itemsize == 4 else "L"


@dataclass(frozen=True, slots=True)
class Units:
    """A prompt (or prompt + output) as the byte sequence the cache hashes."""

    kind: UnitKind
    data: bytes
    unit_size: int  # bytes per unit: 4 for token ids, 1 for text

    @property
    def length(self) -> int:
        return len(self.data) // self.unit_size

    def __add__(self, other: Units) -> Units:
        if other.kind != self.kind:
            raise ValueError(f"cannot join {self.kind} units with {other.kind} units")
        return Units(self.kind, self.data + other.data, self.unit_size)


def units_of(text: str | None = None, input_ids: Sequence[int] | None = None) -> Units | None:
    """Token ids when given (exact), else text; None when neither is usable."""
    if input_ids is not None:
        # array('I') converts a Python int list ~5x faster than numpy and raises on anything
        # that is not an integer in [0, 2**32): exactly the validation wanted.
        try:
            packed = array.array(_U32, input_ids)
        except (TypeError, ValueError, OverflowError):
            return None
        if sys.byteorder != "little":
            packed.byteswap()
        return Units("ids", packed.tobytes(), 4)
    if isinstance(text, str):
        # surrogatepass: a lone surrogate in client JSON must not make hashing raise.
        return Units("text", text.encode("utf-8", "surrogatepass"), 1)
    return None


@dataclass(frozen=True, slots=True)
class CacheHit:
    counts: IntArray  # int32 [L, E], read-only: counts observed over the covered prefix
    covered: int  # units of the prompt covered by the learned sequence
    observed: int  # units of the covered prefix whose routing was observed (<= covered)
    total: int  # units in the looked-up prompt

    @property
    def exact(self) -> bool:
        return self.covered == self.total and self.observed == self.covered


@dataclass(slots=True)
class _Entry:
    counts: IntArray
    observed: int
    length: int
    anchor: int  # chain hash of the aligned prefix the entry's tail hangs off
    tail: int
    nbytes: int


@dataclass
class CacheStats:
    hits: int = 0  # whole prompt covered and observed
    partial: int = 0  # a learned prefix covers part of the prompt (or was partly observed)
    misses: int = 0
    evictions: int = 0


def _chain(previous: int, block: bytes) -> int:
    return hash((previous, block))


def _end_key(anchor: int, tail: bytes) -> int:
    return hash(("end", anchor, tail))


class SignatureCache:
    """LRU cache of prefix expert counts for one model geometry (module docstring)."""

    def __init__(
        self,
        geometry: ModelGeometry,
        *,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        for name, value in (
            ("block_tokens", block_tokens), ("block_bytes", block_bytes),
            ("max_entries", max_entries), ("max_bytes", max_bytes),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"signature cache {name} must be a positive integer, got {value!r}"
                )
        self.geometry = geometry
        self._block = {"ids": block_tokens, "text": block_bytes}
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._tails: dict[int, dict[int, int]] = {}  # anchor -> {tail length: entries}
        self.nbytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    # --- lookup --------------------------------------------------------------------------------
    def lookup(self, units: Units) -> CacheHit | None:
        """Longest learned prefix of `units`; counted in `stats` as hit / partial / miss."""
        hit = self._find(units)
        if hit is None:
            self.stats.misses += 1
        elif hit.exact:
            self.stats.hits += 1
        else:
            self.stats.partial += 1
        return hit

    def _find(self, units: Units) -> CacheHit | None:
        if not self._entries:
            return None
        block = self._block[units.kind]
        step = block * units.unit_size
        data = units.data
        total = units.length
        anchors = self._anchors(units.kind, data, step, total // block)
        for b in range(len(anchors) - 1, -1, -1):
            tails = self._tails.get(anchors[b])
            if not tails:
                continue
            start = b * step
            for t in sorted(tails, reverse=True):
                if b * block + t > total:
                    continue
                key = _end_key(anchors[b], data[start : start + t * units.unit_size])
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return CacheHit(entry.counts, entry.length, entry.observed, total)
        return None

    @staticmethod
    def _anchors(kind: UnitKind, data: bytes, step: int, blocks: int) -> list[int]:
        h = hash(("seed", kind))
        out = [h]
        for j in range(blocks):
            h = _chain(h, data[j * step : (j + 1) * step])
            out.append(h)
        return out

    # --- learning ------------------------------------------------------------------------------
    def learn(self, units: Units, counts: npt.ArrayLike, observed: int | None = None) -> None:
        """Remember that the sequence `units` routed `counts` (int [L, E]) over `observed` of its
        units (default: all of them)."""
        arr = self._check_counts(counts)
        length = units.length
        seen = length if observed is None else observed
        if not 0 <= seen <= length:
            raise ValueError(f"observed units {seen} outside [0, {length}]")
        if length == 0 or seen == 0:
            return
        block = self._block[units.kind]
        b, t = divmod(length, block)
        step = block * units.unit_size
        anchor = self._anchors(units.kind, units.data, step, b)[-1]
        key = _end_key(anchor, units.data[b * step :])
        stored: IntArray = np.array(arr, dtype=np.int32, copy=True)
        stored.setflags(write=False)
        old = self._entries.pop(key, None)
        if old is not None:
            self._forget(old)
        entry = _Entry(stored, seen, length, anchor, t, stored.nbytes + ENTRY_OVERHEAD_BYTES)
        self._entries[key] = entry
        tails = self._tails.setdefault(anchor, {})
        tails[t] = tails.get(t, 0) + 1
        self.nbytes += entry.nbytes
        self._evict()

    def learn_prompt(self, prompt: Units, prompt_counts: npt.ArrayLike) -> None:
        """A prefill-first result: counts over every prompt token."""
        self.learn(prompt, prompt_counts)

    def learn_output(self, prompt: Units, output: Units, output_counts: npt.ArrayLike) -> None:
        """A decode result's output rows. Stored as `prompt + output`, the prefix of the next
        turn, on top of whatever is known about the prompt itself (its longest learned prefix)."""
        out = self._check_counts(output_counts)
        if output.length == 0:
            return
        known = self._find(prompt)
        base: npt.NDArray[np.integer] = out
        seen = 0
        if known is not None:
            base = known.counts.astype(np.int64) + out
            seen = known.observed
        self.learn(prompt + output, base, observed=seen + output.length)

    def _check_counts(self, counts: npt.ArrayLike) -> npt.NDArray[np.integer]:
        arr = np.asarray(counts)
        g = self.geometry
        if arr.shape != (g.num_layers, g.num_experts) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"counts must be integer [{g.num_layers}, {g.num_experts}], "
                f"got {arr.dtype} {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError("counts must be non-negative int32 values")
        return arr

    # --- eviction ------------------------------------------------------------------------------
    def _forget(self, entry: _Entry) -> None:
        self.nbytes -= entry.nbytes
        tails = self._tails.get(entry.anchor)
        if tails is None:
            return
        left = tails.get(entry.tail, 0) - 1
        if left > 0:
            tails[entry.tail] = left
        else:
            tails.pop(entry.tail, None)
            if not tails:
                del self._tails[entry.anchor]

    def _evict(self) -> None:
        while self._entries and (
            len(self._entries) > self.max_entries or self.nbytes > self.max_bytes
        ):
            _, entry = self._entries.popitem(last=False)
            self._forget(entry)
            self.stats.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self._tails.clear()
        self.nbytes = 0
