"""Offline text workloads: task-like and language-like mixes, multi-turn, and trace replay.

A workload is a list of `Conversation`s; a single-turn request is a one-turn conversation. The
text comes from the committed corpus (`loadtest/corpus/corpus.jsonl`, real text extracted from a
stock image, see its README) so every machine builds byte-identical workloads for a seed.

Kinds:
- `task`: a mix of task domains, `code` (stdlib sources), `legal` (licence texts) and
  `translation` (translated UI messages to translate back), each with its own instruction.
- `language`: one request per language mix entry (de, fr, es, it, pt_BR, ru, ja, zh_CN), each
  asking in its own language about messages in that language.
- `trace`: prompts that start with `[trace:N]`, which makes the emulator's `trace` routing
  source replay request N of the real routing traces (`esft_routing_shared.npz`: 108 requests in
  4 domains). The rest of the prompt is corpus text from a domain-matched task, there to give the
  prompt a realistic length and a text signal that correlates with the trace's domain.

Calibration and evaluation are disjoint by source document (by trace request for `trace`): the
split of a document is a pure function of its id (see `split_of`), independent of the seed, so
any calibration workload and any evaluation workload never share a document.

Multi-turn: with `turns > 1` each conversation carries further user turns; the driver sends turn
k+1 after turn k completes, with the prompt = previous prompt + previous output + the new text.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest.corpus.extract import Document

DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "corpus.jsonl"
DEFAULT_TRACES = Path("/work/shared/data/esft_routing_shared.npz")
KINDS = ("task", "language", "trace")
SPLITS = ("calibration", "evaluation")
TASK_DOMAINS = ("code", "legal", "translation")
LANGUAGES = ("de", "fr", "es", "it", "pt_BR", "ru", "ja", "zh_CN")
LANGUAGE_NAMES = {
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt_BR": "Brazilian Portuguese",
    "ru": "Russian",
    "ja": "Japanese",
    "zh_CN": "Simplified Chinese",
}
# One instruction per language, written in that language, so the whole prompt is in it.
LANGUAGE_INSTRUCTIONS = {
    "de": "Erkläre kurz, was die folgenden Programmmeldungen bedeuten:",
    "fr": "Explique brièvement ce que signifient les messages suivants :",
    "es": "Explica brevemente qué significan los siguientes mensajes:",
    "it": "Spiega brevemente cosa significano i seguenti messaggi:",
    "pt_BR": "Explique brevemente o que significam as seguintes mensagens:",
    "ru": "Кратко объясни, что означают следующие сообщения:",
    "ja": "次のメッセージの意味を簡単に説明してください：",
    "zh_CN": "请简要解释以下消息的含义：",
}
LANGUAGE_FOLLOWUPS = {
    "de": "Und diese Meldungen?",
    "fr": "Et ces messages-ci ?",
    "es": "¿Y estos mensajes?",
    "it": "E questi messaggi?",
    "pt_BR": "E estas mensagens?",
    "ru": "А эти сообщения?",
    "ja": "では、これらのメッセージは？",
    "zh_CN": "那这些消息呢？",
}
# The ESFT traces' task domains mapped to the corpus task whose text fills the prompt.
TRACE_DOMAIN_TASK = {
    "law": "legal",
    "translation": "translation",
    "summary": "legal",
    "intent": "code",
}


class WorkloadError(ValueError):
    """A workload cannot be built or read; the message names the offending field."""


@dataclass(frozen=True, slots=True)
class Turn:
    text: str  # the new user text of this turn
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    kind: str
    domain: str  # task domain, language code, or trace domain
    doc_id: str
    split: str
    turns: tuple[Turn, ...]
    trace_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["turns"] = [asdict(t) for t in self.turns]
        return d

    @classmethod
    def from_dict(cls, data: Any, where: str = "conversation") -> Conversation:
        if not isinstance(data, dict):
            raise WorkloadError(f"{where} must be a JSON object")
        for key in ("conversation_id", "kind", "domain", "doc_id", "split", "turns"):
            if key not in data:
                raise WorkloadError(f"{where} is missing field {key!r}")
        turns_raw = data["turns"]
        if not isinstance(turns_raw, list) or not turns_raw:
            raise WorkloadError(f"{where}.turns must be a non-empty list")
        turns = []
        for i, t in enumerate(turns_raw):
            if not isinstance(t, dict) or not isinstance(t.get("text"), str):
                raise WorkloadError(f"{where}.turns[{i}].text must be a string")
            mt = t.get("max_tokens")
            if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
                raise WorkloadError(f"{where}.turns[{i}].max_tokens must be a positive integer")
            turns.append(Turn(t["text"], mt))
        trace = data.get("trace_index")
        if trace is not None and (not isinstance(trace, int) or trace < 0):
            raise WorkloadError(f"{where}.trace_index must be a non-negative integer or null")
        return cls(
            conversation_id=str(data["conversation_id"]),
            kind=str(data["kind"]),
            domain=str(data["domain"]),
            doc_id=str(data["doc_id"]),
            split=str(data["split"]),
            turns=tuple(turns),
            trace_index=trace,
        )


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    kind: str = "task"
    split: str = "evaluation"
    num_conversations: int = 100
    seed: int = 0
    turns: int = 1
    min_prompt_chars: int = 400
    max_prompt_chars: int = 1600
    min_output_tokens: int = 64
    max_output_tokens: int = 256
    calibration_fraction: float = 0.3
    mix: dict[str, float] = field(default_factory=dict)  # domain -> weight; empty = uniform

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkloadError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.split not in SPLITS:
            raise WorkloadError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("num_conversations", "turns", "min_prompt_chars", "min_output_tokens"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_chars < self.min_prompt_chars:
            raise WorkloadError("max_prompt_chars must be >= min_prompt_chars")
        if self.max_output_tokens < self.min_output_tokens:
            raise WorkloadError("max_output_tokens must be >= min_output_tokens")
        if not 0 < self.calibration_fraction < 1:
            raise WorkloadError("calibration_fraction must be in (0, 1)")
        for domain, weight in self.mix.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise WorkloadError(f"mix[{domain!r}] must be a finite weight >= 0")


def load_corpus(path: Path = DEFAULT_CORPUS) -> list[Document]:
    if not path.is_file():
        raise WorkloadError(
            f"corpus not found at {path}; "
            "rebuild it with `python -m loadtest workloads build-corpus`"
        )
    docs = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
            docs.append(Document(**raw))
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise WorkloadError(f"{path}:{n}: not a corpus document: {exc}") from exc
    if not docs:
        raise WorkloadError(f"corpus {path} is empty")
    return docs


def _rank_key(item: str) -> str:
    # A fixed hash order: the split depends only on the ids, never on a seed or file order.
    return hashlib.sha256(item.encode("utf-8")).hexdigest()


def split_members(ids: Sequence[str], calibration_fraction: float) -> dict[str, str]:
    """Assign each id of one group to a split: the first ceil(f*n) in hash order calibrate.

    Groups of two or more always get at least one evaluation member.
    """
    ordered = sorted(set(ids), key=_rank_key)
    n_cal = math.ceil(calibration_fraction * len(ordered))
    if len(ordered) >= 2:
        n_cal = min(n_cal, len(ordered) - 1)
    return {item: ("calibration" if i < n_cal else "evaluation") for i, item in enumerate(ordered)}


def document_splits(docs: Sequence[Document], calibration_fraction: float) -> dict[str, str]:
    """doc_id -> split, stratified by (domain, language) so every group has both splits."""
    groups: dict[tuple[str, str], list[str]] = {}
    for d in docs:
        groups.setdefault((d.domain, d.language), []).append(d.doc_id)
    out: dict[str, str] = {}
    for ids in groups.values():
        out.update(split_members(ids, calibration_fraction))
    return out


def _passage(text: str, target_chars: int, rng: np.random.Generator) -> str:
    """A run of whole lines of about `target_chars`, starting at a random line."""
    lines = text.splitlines()
    if not lines:
        return text
    start = int(rng.integers(len(lines)))
    out: list[str] = []
    size = 0
    for i in range(len(lines)):
        line = lines[(start + i) % len(lines)]
        out.append(line)
        size += len(line) + 1
        if size >= target_chars:
            break
    return "\n".join(out)[: max(target_chars, 1) * 2]


def _task_text(domain: str, doc: Document, passage: str, first: bool) -> str:
    if domain == "code":
        head = (
            "Explain what the following Python code does and suggest one improvement:"
            if first
            else "Here is the next part of the same file. Explain it as well:"
        )
        return f"{head}\n\n```python\n{passage}\n```"
    if domain == "legal":
        head = (
            "Summarise the obligations in this licence excerpt in plain English:"
            if first
            else "Continue with this further excerpt of the same licence:"
        )
        return f"{head}\n\n{passage}"
    if domain == "translation":
        lang = LANGUAGE_NAMES.get(doc.language, doc.language)
        head = (
            f"Translate these {lang} software messages into English:"
            if first
            else "Translate these ones too:"
        )
        return f"{head}\n\n{passage}"
    # language mix: the domain is the language itself
    head = LANGUAGE_INSTRUCTIONS[domain] if first else LANGUAGE_FOLLOWUPS[domain]
    return f"{head}\n\n{passage}"


def _pick_doc(pool: Sequence[Document], rng: np.random.Generator, empty_message: str) -> Document:
    """One document drawn uniformly from `pool` (one rng draw); `empty_message` if none."""
    if not pool:
        raise WorkloadError(empty_message)
    return pool[int(rng.integers(len(pool)))]


def _docs_for(domain: str, docs: Sequence[Document]) -> list[Document]:
    if domain in ("code", "legal"):
        return [d for d in docs if d.domain == domain]
    if domain == "translation":
        return [d for d in docs if d.domain == "language"]
    return [d for d in docs if d.domain == "language" and d.language == domain]


def _pick_domains(
    spec: WorkloadSpec, domains: Sequence[str], rng: np.random.Generator
) -> list[str]:
    unknown = sorted(set(spec.mix) - set(domains))
    if unknown:
        raise WorkloadError(
            f"mix names unknown domain(s) {unknown} for kind {spec.kind!r}; known: {list(domains)}"
        )
    weights = np.array([spec.mix.get(d, 1.0 if not spec.mix else 0.0) for d in domains], float)
    if weights.sum() <= 0:
        raise WorkloadError("mix weights must not all be zero")
    idx = rng.choice(len(domains), size=spec.num_conversations, p=weights / weights.sum())
    return [domains[i] for i in idx]


def _build_turns(
    spec: WorkloadSpec, task: str, doc: Document, rng: np.random.Generator, prefix: str = ""
) -> tuple[Turn, ...]:
    turns = []
    for k in range(spec.turns):
        # Follow-up turns bring half-size passages: a conversation grows by prompt + output.
        lo, hi = spec.min_prompt_chars, spec.max_prompt_chars
        if k:
            lo, hi = max(1, lo // 2), max(1, hi // 2)
        target = int(rng.integers(lo, hi + 1))
        text = _task_text(task, doc, _passage(doc.text, target, rng), first=k == 0)
        max_tokens = int(rng.integers(spec.min_output_tokens, spec.max_output_tokens + 1))
        turns.append(Turn(text=(prefix + text) if k == 0 else text, max_tokens=max_tokens))
    return tuple(turns)


def build_workload(
    spec: WorkloadSpec,
    corpus: Sequence[Document] | None = None,
    traces_path: Path = DEFAULT_TRACES,
) -> list[Conversation]:
    """Deterministic for (spec, corpus, traces): the same inputs give the same conversations."""
    docs = list(corpus) if corpus is not None else load_corpus()
    splits = document_splits(docs, spec.calibration_fraction)
    usable = [d for d in docs if splits[d.doc_id] == spec.split]
    rng = np.random.default_rng(spec.seed)
    out: list[Conversation] = []
    if spec.kind == "trace":
        return _build_trace_workload(spec, usable, traces_path, rng)
    domains = TASK_DOMAINS if spec.kind == "task" else LANGUAGES
    for i, domain in enumerate(_pick_domains(spec, domains, rng)):
        doc = _pick_doc(_docs_for(domain, usable), rng,
                        f"no {spec.split} documents for domain {domain!r} in the corpus")
        out.append(
            Conversation(
                conversation_id=f"{spec.kind}-{spec.split}-{spec.seed}-{i}",
                kind=spec.kind,
                domain=domain,
                doc_id=doc.doc_id,
                split=spec.split,
                turns=_build_turns(spec, domain, doc, rng),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class TraceIndex:
    domains: tuple[str, ...]  # domain of trace request i

    @classmethod
    def load(cls, path: Path) -> TraceIndex:
        if not path.is_file():
            raise WorkloadError(f"routing traces not found at {path} (needed for kind 'trace')")
        with np.load(path, allow_pickle=False) as data:
            if "domain" not in data.files:
                raise WorkloadError(f"{path} has no 'domain' array")
            return cls(tuple(str(d) for d in data["domain"]))


def trace_splits(trace: TraceIndex, calibration_fraction: float) -> dict[int, str]:
    """Trace request index -> split, stratified by domain (each request is one source line)."""
    by_domain: dict[str, list[str]] = {}
    for i, dom in enumerate(trace.domains):
        by_domain.setdefault(dom, []).append(f"trace/{i}")
    out: dict[int, str] = {}
    for ids in by_domain.values():
        for key, split in split_members(ids, calibration_fraction).items():
            out[int(key.split("/")[1])] = split
    return out


def _build_trace_workload(
    spec: WorkloadSpec, usable: Sequence[Document], traces_path: Path, rng: np.random.Generator
) -> list[Conversation]:
    trace = TraceIndex.load(traces_path)
    splits = trace_splits(trace, spec.calibration_fraction)
    domains = sorted(set(trace.domains))
    by_domain = {
        d: [i for i, dom in enumerate(trace.domains) if dom == d and splits[i] == spec.split]
        for d in domains
    }
    out = []
    for i, domain in enumerate(_pick_domains(spec, domains, rng)):
        if not by_domain[domain]:
            raise WorkloadError(f"no {spec.split} trace requests in domain {domain!r}")
        index = by_domain[domain][int(rng.integers(len(by_domain[domain])))]
        task = TRACE_DOMAIN_TASK.get(domain, "code")
        doc = _pick_doc(_docs_for(task, usable), rng,
                        f"no {spec.split} documents for trace filler task {task!r}")
        out.append(
            Conversation(
                conversation_id=f"trace-{spec.split}-{spec.seed}-{i}",
                kind="trace",
                domain=domain,
                doc_id=f"trace/{index}",
                split=spec.split,
                turns=_build_turns(spec, task, doc, rng, prefix=f"[trace:{index}] "),
                trace_index=index,
            )
        )
    return out


def save_workload(convs: Sequence[Conversation], path: Path) -> None:
    path.write_bytes(b"".join(orjson.dumps(c.to_dict()) + b"\n" for c in convs))


def load_workload(path: Path) -> list[Conversation]:
    if not path.is_file():
        raise WorkloadError(f"workload file not found: {path}")
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{n}: invalid JSON: {exc}") from exc
        out.append(Conversation.from_dict(raw, where=f"{path}:{n}"))
    if not out:
        raise WorkloadError(f"workload file {path} holds no conversations")
    return out


def parse_mix(text: str | None) -> dict[str, float]:
    """`code=2,legal=1` -> {"code": 2.0, "legal": 1.0}."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise WorkloadError(f"--mix entry {part!r} must look like DOMAIN=WEIGHT") from exc
    return out


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload flags shared by `workloads build`, `run` and `compare`."""
    g = parser.add_argument_group("workload")
    g.add_argument("--split", choices=SPLITS, default="evaluation")
    g.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    g.add_argument("--turns", type=int, default=1, help="user turns per conversation")
    g.add_argument("--min-prompt-chars", type=int, default=400)
    g.add_argument("--max-prompt-chars", type=int, default=1600)
    g.add_argument("--min-output-tokens", type=int, default=64)
    g.add_argument("--max-output-tokens", type=int, default=256, help="output length cap")
    g.add_argument("--mix", default=None, help="domain weights, e.g. code=2,legal=1")
    g.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    g.add_argument("--traces", type=Path, default=DEFAULT_TRACES)


def spec_from_args(
    args: argparse.Namespace, kind: str, num: int, split: str | None = None
) -> WorkloadSpec:
    return WorkloadSpec(
        kind=kind,
        split=split or args.split,
        num_conversations=num,
        seed=args.seed,
        turns=args.turns,
        min_prompt_chars=args.min_prompt_chars,
        max_prompt_chars=args.max_prompt_chars,
        min_output_tokens=args.min_output_tokens,
        max_output_tokens=args.max_output_tokens,
        mix=parse_mix(args.mix),
    )


def workload_from_args(
    args: argparse.Namespace, kind_or_path: str, num: int, split: str | None = None
) -> list[Conversation]:
    """A kind name builds a workload; anything else is read as a workload JSON-lines file."""
    if kind_or_path in KINDS:
        spec = spec_from_args(args, kind_or_path, num, split)
        return build_workload(spec, load_corpus(args.corpus), args.traces)
    return load_workload(Path(kind_or_path))[:num]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Build offline text workloads (JSON lines) or rebuild the corpus."
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="write a workload as JSON lines")
    build.add_argument("--kind", choices=KINDS, default="task")
    build.add_argument("--num", type=int, default=100, help="conversations")
    build.add_argument("--out", type=Path, default=None, help="file (default: stdout)")
    add_workload_arguments(build)
    stats = sub.add_parser("stats", help="summarise a workload file")
    stats.add_argument("path", type=Path)
    corpus = sub.add_parser("build-corpus", help="re-extract the committed corpus")
    corpus.add_argument("--out", type=Path, default=DEFAULT_CORPUS)


def main(args: argparse.Namespace) -> int:
    try:
        if args.action == "build-corpus":
            from loadtest.corpus.extract import build_corpus, write_corpus

            docs = build_corpus()
            size = write_corpus(docs, args.out)
            print(f"wrote {len(docs)} documents, {size} bytes, to {args.out}")
            return 0
        if args.action == "stats":
            convs = load_workload(args.path)
            print(orjson.dumps(workload_stats(convs), option=orjson.OPT_INDENT_2).decode())
            return 0
        convs = workload_from_args(args, args.kind, args.num)
        data = b"".join(orjson.dumps(c.to_dict()) + b"\n" for c in convs)
        if args.out is None:
            sys.stdout.buffer.write(data)
        else:
            args.out.write_bytes(data)
            print(f"wrote {len(convs)} conversations to {args.out}", file=sys.stderr)
        return 0
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def workload_stats(convs: Sequence[Conversation]) -> dict[str, Any]:
    chars = [len(t.text) for c in convs for t in c.turns]
    return {
        "conversations": len(convs),
        "requests": sum(len(c.turns) for c in convs),
        "domains": dict(Counter(c.domain for c in convs)),
        "documents": len({c.doc_id for c in convs}),
        "splits": dict(Counter(c.split for c in convs)),
        "prompt_chars_mean": sum(chars) / len(chars) if chars else 0,
        "max_tokens_mean": (sum(t.max_tokens for c in convs for t in c.turns) / max(1, len(chars))),
    }
