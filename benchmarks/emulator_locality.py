"""Does the emulator's decode step respond to expert locality, and how well does prefill
routing predict decode routing? Rerunnable; prints tables; nothing here is tuned.

For each routing source it builds decode batches of same-domain requests and of mixed-domain
requests of the same size, steps them through the routing source for `--steps` decode steps,
and reports the mean number of distinct experts per layer per step and the cost model's step
time (same KV token count for both, so only the experts differ). A uniformly random router is
printed as a reference point. Then, per request, it compares the prefill expert-count vector
with the decode expert-count vector (cosine and Pearson over all layer x expert cells), for the
same request and for other requests of the same and of other domains.

Text for `token-hash` comes from files already on the machine (four domains): Python standard
library sources, the licence texts in /usr/share/common-licenses, and the German and French
translations in the gettext catalogues under /usr/share/locale. The `trace` source replays the
ESFT routing data (4 task domains).

    python benchmarks/emulator_locality.py [--batch 64] [--trace-batch 16] [--steps 32]
"""

from __future__ import annotations

import os

# Before numpy loads: the routing matmuls are small ([32, 64] x [64, L*E]); multi-threaded
# OpenBLAS spends ~9x more CPU on them than one thread on this 2-core machine (0.5 ms vs 4.6 ms
# CPU per [32,64]x[64,6144] product, measured), and an emulator runs many workers anyway.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import struct
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.emulator.costmodel import CostModel
from loadtest.emulator.routing import (
    CONTEXT_DECAY,
    CONTEXT_MIX,
    TOPIC_MIX,
    RoutingSource,
    RoutingTrace,
    TokenHashRouting,
    TraceRouting,
    default_trace_path,
)
from loadtest.emulator.tokenizer import Tokenizer
from zones.geometry import ModelGeometry, geometry_by_name
from zones.routed_experts import counts_from_expert_ids

MAX_FILE_CHARS = 200_000


@dataclass(frozen=True)
class Request:
    domain: str
    text: str | None
    ids: list[int]


# -- text corpora --------------------------------------------------------------------------
def read_mo_strings(path: Path) -> list[str]:
    """Translated strings of a GNU gettext .mo file (format: GNU gettext manual, 'MO Files')."""
    data = path.read_bytes()
    if len(data) < 20:
        return []
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">"
    _, count, _, trans_off = struct.unpack(endian + "4I", data[4:20])
    out = []
    for i in range(count):
        entry = trans_off + 8 * i
        length, offset = struct.unpack(endian + "2I", data[entry: entry + 8])
        text = data[offset: offset + length].decode("utf-8", errors="replace")
        if text and not text.startswith("Project-Id-Version"):
            out.append(text.replace("\x00", "\n"))
    return out


def domain_texts() -> dict[str, str]:
    texts: dict[str, str] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(errors="replace") for sub in ("asyncio", "email", "json", "http")
            for p in sorted((stdlib / sub).glob("*.py"))]
    texts["python-code"] = "\n".join(code)
    lic = Path("/usr/share/common-licenses")
    texts["licenses"] = "\n".join(p.read_text(errors="replace")
                                  for p in sorted(lic.glob("*")) if p.is_file())
    for lang, name in (("de", "german-ui"), ("fr", "french-ui")):
        mo = sorted(Path(f"/usr/share/locale/{lang}/LC_MESSAGES").glob("*.mo"))
        texts[name] = "\n".join(s for p in mo for s in read_mo_strings(p))
    return {k: v for k, v in texts.items() if len(v.split()) > 5000}


def chunk_requests(domain: str, text: str, tok: Tokenizer, n: int, prompt_tokens: int,
                   rng: np.random.Generator) -> list[Request]:
    """`n` prompts of `prompt_tokens` tokens from random, non-overlapping places in the text."""
    ids = tok.encode(text)
    starts = np.arange(0, len(ids) - prompt_tokens, prompt_tokens)
    if len(starts) < n:
        raise SystemExit(f"domain {domain}: only {len(starts)} prompts available, need {n}")
    chosen = rng.choice(starts, size=n, replace=False)
    return [Request(domain, None, ids[s: s + prompt_tokens]) for s in chosen]


# -- measurement ---------------------------------------------------------------------------
def decode_experts(source: RoutingSource, req: Request, steps: int, seed: int) -> np.ndarray:
    """[steps, L, K] experts of the first `steps` decode tokens of a request."""
    stream = source.continuation(req.ids, req.text, seed)
    return np.stack([e for _, e in itertools.islice(stream, steps)])


def batch_distinct(decode: Sequence[np.ndarray], geometry: ModelGeometry) -> np.ndarray:
    """[steps] mean over layers of distinct experts the batch uses at each step."""
    stacked = np.stack(decode)                         # [B, steps, L, K]
    out = []
    for s in range(stacked.shape[1]):
        ids = stacked[:, s]                            # [B, L, K]
        used = np.zeros((geometry.num_layers, geometry.num_experts), dtype=bool)
        layers = np.broadcast_to(np.arange(geometry.num_layers)[None, :, None], ids.shape)
        used[layers.ravel(), ids.ravel()] = True
        out.append(used.sum(axis=1))
    return np.stack(out)                               # [steps, L]


def locality_rows(name: str, groups: dict[str, list[np.ndarray]], geometry: ModelGeometry,
                  batch: int, trials: int, rng: np.random.Generator) -> list[tuple]:
    """Same-domain batches per domain, mixed batches, random-router reference."""
    model = CostModel.for_geometry(geometry)
    kv = batch * 1024      # identical KV for every row: only the experts differ
    rows = []

    def measure(batches: list[list[np.ndarray]]) -> tuple[float, float]:
        distinct = [batch_distinct(b, geometry) for b in batches]          # each [steps, L]
        mean_d = float(np.mean([d.mean() for d in distinct]))
        step = float(np.mean([model.decode_step_seconds(batch, layer_d, kv)
                              for d in distinct for layer_d in d]))
        return mean_d, step

    same_all: list[list[np.ndarray]] = []
    for domain, reqs in groups.items():
        if len(reqs) < batch:
            continue
        batches = [[reqs[i] for i in rng.choice(len(reqs), batch, replace=False)]
                   for _ in range(trials)]
        same_all += batches
        rows.append((name, f"same: {domain}", *measure(batches)))
    per = batch // len(groups)
    mixed = []
    for _ in range(trials):
        b: list[np.ndarray] = []
        for reqs in groups.values():
            b += [reqs[i] for i in rng.choice(len(reqs), per, replace=False)]
        mixed.append(b)
    same = measure(same_all)
    mix = measure(mixed)
    steps = next(iter(groups.values()))[0].shape[0]
    shape = (steps, geometry.num_layers, geometry.num_experts)
    random_batches = [[rng.random(shape).argsort(axis=2)[:, :, : geometry.top_k]
                       for _ in range(batch)] for _ in range(trials)]
    rand = measure(random_batches)
    rows.append((name, "same-domain (all)", *same))
    rows.append((name, f"mixed ({len(groups)} domains)", *mix))
    rows.append((name, "uniform random router", *rand))
    rows.append((name, "RATIO mixed / same", mix[0] / same[0], mix[1] / same[1]))
    return rows


def correlation_rows(name: str, prefill: list[np.ndarray], decode: list[np.ndarray],
                     domains: list[str]) -> list[tuple]:
    """Prefill-vs-decode expert-count similarity: same request vs other requests."""
    p = np.stack([c.ravel().astype(np.float64) for c in prefill])
    d = np.stack([c.ravel().astype(np.float64) for c in decode])
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    cos = pn @ dn.T
    pc = p - p.mean(axis=1, keepdims=True)
    dc = d - d.mean(axis=1, keepdims=True)
    pear = (pc / np.linalg.norm(pc, axis=1, keepdims=True)) @ (
        dc / np.linalg.norm(dc, axis=1, keepdims=True)).T
    dom = np.array(domains)
    same_dom = dom[:, None] == dom[None, :]
    eye = np.eye(len(dom), dtype=bool)
    rank1 = float(np.mean(cos.argmax(axis=0) == np.arange(len(dom))))   # decode -> own prefill
    rows = []
    for label, m in (("cosine", cos), ("pearson", pear)):
        rows.append((name, label, float(m[eye].mean()), float(m[same_dom & ~eye].mean()),
                     float(m[~same_dom].mean())))
    rows.append((name, "decode finds own prefill (top-1 of all)", rank1, float("nan"),
                 float("nan")))
    return rows


# -- sources -------------------------------------------------------------------------------
def run_token_hash(args: argparse.Namespace, rng: np.random.Generator):
    geometry = geometry_by_name(args.model)
    tok = Tokenizer()
    source = TokenHashRouting(geometry, tok, seed=args.seed, context_mix=args.context_mix,
                              context_decay=args.context_decay, topic_mix=args.topic_mix)
    texts = domain_texts()
    if len(texts) < 2:
        raise SystemExit("token-hash needs text from at least 2 domains on this machine")
    per_domain = max(args.batch, 2 * args.batch // len(texts))
    requests = [r for d, t in texts.items()
                for r in chunk_requests(d, t, tok, per_domain, args.prompt_tokens, rng)]
    corr_steps = max(args.steps, args.corr_decode_tokens)
    decodes: dict[str, list[np.ndarray]] = {}
    prefills, decode_counts = [], []
    for i, req in enumerate(requests):
        dec = decode_experts(source, req, corr_steps, seed=i)
        decodes.setdefault(req.domain, []).append(dec[: args.steps])
        prefills.append(counts_from_expert_ids(source.route_prompt(req.ids, req.text), geometry))
        decode_counts.append(counts_from_expert_ids(dec[: args.corr_decode_tokens], geometry))
    loc = locality_rows(f"token-hash/{geometry.name}", decodes, geometry, args.batch,
                        args.trials, rng)
    corr = correlation_rows(f"token-hash/{geometry.name}", prefills, decode_counts,
                            [r.domain for r in requests])
    return loc, corr, {d: len(t.split()) for d, t in texts.items()}


def run_trace(args: argparse.Namespace, rng: np.random.Generator):
    path = Path(args.trace_path) if args.trace_path else default_trace_path()
    trace = RoutingTrace.load(path)
    tok = Tokenizer()
    source = TraceRouting(trace, tok, prefill_fraction=args.prefill_fraction)
    geometry = trace.geometry
    decodes: dict[str, list[np.ndarray]] = {}
    prefills, decode_counts = [], []
    for i in range(trace.num_requests):
        pre, dec = source.split(i)
        marker = f"[trace:{i}]"
        req = Request(trace.domains[i], marker, tok.encode(marker))
        steps = decode_experts(source, req, args.steps, seed=i)
        decodes.setdefault(trace.domains[i], []).append(steps)
        prefills.append(counts_from_expert_ids(pre, geometry))
        decode_counts.append(counts_from_expert_ids(dec, geometry))   # the whole decode part
    loc = locality_rows(f"trace/{geometry.name}", decodes, geometry, args.trace_batch,
                        args.trials, rng)
    corr = correlation_rows(f"trace/{geometry.name}", prefills, decode_counts, trace.domains)
    return loc, corr, {d: len(v) for d, v in decodes.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="Qwen3-30B-A3B", help="geometry for token-hash")
    ap.add_argument("--batch", type=int, default=64, help="token-hash decode batch size")
    ap.add_argument("--trace-batch", type=int, default=16,
                    help="trace decode batch size (the smallest usable ESFT domains hold 17-20)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per batch")
    ap.add_argument("--trials", type=int, default=5, help="random batches per row")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--corr-decode-tokens", type=int, default=128,
                    help="decode tokens per request for the token-hash correlation")
    ap.add_argument("--prefill-fraction", type=float, default=0.5)
    ap.add_argument("--trace-path", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--context-mix", type=float, default=CONTEXT_MIX,
                    help="token-hash context weight (sensitivity only; the emulator default)")
    ap.add_argument("--context-decay", type=float, default=CONTEXT_DECAY)
    ap.add_argument("--topic-mix", type=float, default=TOPIC_MIX,
                    help="token-hash topic weight (the emulator default is fitted by "
                         "benchmarks/routing_stats.py --fit)")
    ap.add_argument("--source", choices=("token-hash", "trace", "both"), default="both")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    loc_rows, corr_rows = [], []
    if args.source in ("token-hash", "both"):
        loc, corr, sizes = run_token_hash(args, rng)
        print(f"token-hash domains (words): {sizes}")
        loc_rows += loc
        corr_rows += corr
    if args.source in ("trace", "both"):
        loc, corr, sizes = run_trace(args, rng)
        print(f"trace domains (requests): {sizes}")
        loc_rows += loc
        corr_rows += corr
    print(f"\nDecode batches ({args.steps} steps, {args.trials} random batches per row; "
          f"token-hash batch {args.batch}, trace batch {args.trace_batch}; KV = batch x 1024)")
    print(f"{'source':32} {'batch':28} {'distinct/layer':>15} {'step ms':>9}")
    for src, label, d, s in loc_rows:
        if label.startswith("RATIO"):
            print(f"{src:32} {label:28} {d:>14.3f}x {s:>8.3f}x")
        else:
            print(f"{src:32} {label:28} {d:>15.2f} {s * 1e3:>9.3f}")
    print("\nPrefill vs decode expert counts (per request, all layers x experts)")
    print(f"{'source':32} {'measure':40} {'same req':>9} {'other req, same dom':>20} "
          f"{'other dom':>10}")
    for src, label, a, b, c in corr_rows:
        print(f"{src:32} {label:40} {a:>9.3f} {b:>20.3f} {c:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
