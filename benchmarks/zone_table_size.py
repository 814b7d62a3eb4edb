"""Zone-table encodings: file size, load time and decision agreement with the float32 table.

    python benchmarks/zone_table_size.py            # 64 zones x 6,144 dims + predictor, and ESFT
    python benchmarks/zone_table_size.py --zones 128

Part 1 builds a realistic large table: Qwen3-30B-A3B geometry (48 MoE layers x 128 experts,
top-8) with every layer kept, so D = 6,144, 64 zones, and the default predictor (2,048 buckets,
rank 32). Requests are Poisson expert counts drawn from per-zone Dirichlet(0.3) expert
preferences mixed 60/40 with a per-request Dirichlet(0.5) component, 50-1,000 prompt tokens;
centroids are the normalised zone means (what balanced k-means converges to). Held-out
signatures and prompts measure, for each encoding, how often the encoded table makes the same
decision as the float32 one: the top zone (`zone_of`), the locality band (tau, min-2), the
worker picked from the band under random loads, and the predictor's top zone.

Part 2 does the same on REAL routing (../shared/data/esft_routing_shared.npz, DeepSeek-V2-Lite,
26 x 64): tables fitted by `zones fit` defaults (layer mask chosen by rho) at K = 4 and 8, every
request's prompt-part and decode-part signature evaluated (the trace has no prefill/decode
boundary: the leading half of each request's tokens plays the prompt, as in zones.inputs).

Load time is `zones.table.parse_table` on the file bytes (median of 7), checksum included.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from zones import table as zt
from zones.arrays import Compression, Encoding
from zones.geometry import KNOWN_GEOMETRIES
from zones.predictor import train_predictor
from zones.signature import SignatureSpec, idf_weights

CONFIGMAP_LIMIT = 1 << 20
_SIGNATURE_WIDE = ("centroids", "predictor.basis")
_FLOAT_FIELDS = ("signature.idf", "centroids", "predictor.weights", "predictor.bias",
                 "predictor.basis")


def _all(
    encoding: Encoding, compression: Compression, per_layer: bool = False
) -> dict[str, zt.ArrayCodec]:
    # Per-layer segments only fit arrays whose last axis is the signature (D = layers x E).
    return {
        f: zt.ArrayCodec(encoding, compression, per_layer and f in _SIGNATURE_WIDE)
        for f in _FLOAT_FIELDS
    }


# name -> COMPACT_ARRAYS to try (None: schema version 1, float32).
OPTIONS: dict[str, dict[str, zt.ArrayCodec] | None] = {
    "v1 float32": None,
    "float32+zlib": _all("raw", "zlib"),
    "f16": _all("f16", None),
    "f16+zlib": _all("f16", "zlib"),
    "q8 per row": _all("q8", None),
    "q8 per row+zlib": _all("q8", "zlib"),
    "q8 per layer+zlib": _all("q8", "zlib", per_layer=True),
    "chosen (COMPACT_ARRAYS)": dict(zt.COMPACT_ARRAYS),
}


@contextmanager
def compact_arrays(codecs: dict[str, zt.ArrayCodec]) -> Iterator[None]:
    saved = dict(zt.COMPACT_ARRAYS)
    zt.COMPACT_ARRAYS.clear()
    zt.COMPACT_ARRAYS.update(codecs)
    try:
        yield
    finally:
        zt.COMPACT_ARRAYS.clear()
        zt.COMPACT_ARRAYS.update(saved)


def band(sims: np.ndarray, tau: float, min_candidates: int) -> np.ndarray:
    """Boolean [N, K] band membership: within tau of the best, widened to min_candidates."""
    best = sims.max(axis=1, keepdims=True)
    member = sims >= best - tau
    order = np.argsort(-sims, axis=1, kind="stable")[:, :min_candidates]
    np.put_along_axis(member, order, True, axis=1)
    return member


def pick(member: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """Least-loaded band member (ties: lowest index), as gateway.eldr.band decides."""
    return np.argmin(np.where(member, loads, np.iinfo(np.int64).max), axis=1)


def agreement(
    ref: zt.ZoneTable, other: zt.ZoneTable, sigs: np.ndarray, rng: np.random.Generator
) -> dict[str, float]:
    a = sigs @ ref.centroids.T
    b = sigs @ other.centroids.T
    ba, bb = band(a, ref.tau, ref.min_candidates), band(b, ref.tau, ref.min_candidates)
    loads = rng.integers(0, 32, size=a.shape)
    return {
        "zone_of": float(np.mean(a.argmax(1) == b.argmax(1))),
        "band": float(np.mean(np.all(ba == bb, axis=1))),
        "pick": float(np.mean(pick(ba, loads) == pick(bb, loads))),
        "max_abs_sim_err": float(np.max(np.abs(a - b))),
    }


def predictor_agreement(ref: zt.ZoneTable, other: zt.ZoneTable, texts: list[str]) -> float:
    assert ref.predictor is not None and other.predictor is not None
    same = 0
    for text in texts:
        pa, pb = ref.predictor.predict(text, None), other.predictor.predict(text, None)
        assert pa is not None and pb is not None
        same += int(np.argmax(ref.centroids @ pa) == np.argmax(other.centroids @ pb))
    return same / len(texts)


def synthetic(k: int, seed: int) -> tuple[zt.ZoneTable, np.ndarray, list[str]]:
    g = KNOWN_GEOMETRIES["Qwen3-30B-A3B"]
    rng = np.random.default_rng(seed)
    layers, experts, top = g.num_layers, g.num_experts, g.top_k
    pref = rng.dirichlet(np.full(experts, 0.3), size=(k, layers)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.integers(0, k, size=n)
        own = rng.dirichlet(np.full(experts, 0.5), size=(n, layers)).astype(np.float32)
        tokens = rng.integers(50, 1000, size=n)
        lam = (0.6 * pref[z] + 0.4 * own) * (tokens * top)[:, None, None]
        return rng.poisson(lam).astype(np.int32), z

    train, z_train = draw(6000)
    test, z_test = draw(4000)
    spec = SignatureSpec(g, idf_weights(train), np.ones(layers, dtype=bool))
    sig_train, _ = spec.build_many(train)
    sig_test, _ = spec.build_many(test)
    centroids = np.stack([sig_train[z_train == c].mean(axis=0) for c in range(k)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    vocab = [[f"w{c}_{j}" for j in range(40)] for c in range(k)]
    shared = [f"s{j}" for j in range(400)]

    def prompt(z: int) -> str:
        words = list(rng.choice(vocab[z], 20)) + list(rng.choice(shared, 60))
        rng.shuffle(words)
        return " ".join(words)

    m = 2000
    predictor = train_predictor([prompt(int(z)) for z in z_train[:m]], None, sig_train[:m])
    table = zt.make_table(
        spec,
        centroids,
        [f"http://decode-{i}.sglang-decode:30000" for i in range(k)],
        predictor=predictor,
        fit_stats={"zone_sizes": np.bincount(z_train, minlength=k).tolist(), "rho": 0.5},
        provenance={"tool": "benchmarks/zone_table_size.py", "seed": seed},
    )
    return table, sig_test, [prompt(int(z)) for z in z_test[:1000]]


def load_seconds(data: bytes) -> float:
    times = []
    for _ in range(7):
        start = time.perf_counter()
        zt.parse_table(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(
    title: str, table: zt.ZoneTable, sigs: np.ndarray, texts: list[str] | None
) -> None:
    print(f"== {title}: K={table.num_zones}, D={table.spec.dim}, "
          f"predictor={'yes' if table.predictor is not None else 'no'}, {len(sigs)} signatures")
    print(f"{'option':<24} {'bytes':>10} {'MiB':>6} {'fits':>5} {'load ms':>8} {'zone_of':>8} "
          f"{'band':>7} {'pick':>7} {'max|ds|':>8}" + (f" {'pred':>6}" if texts else ""))
    for name, codecs in OPTIONS.items():
        if codecs is None:
            encoded = table
            data = zt.table_to_json(table)
        else:
            with compact_arrays(codecs):
                encoded = zt.convert(table, zt.COMPACT_SCHEMA_VERSION)
                data = zt.table_to_json(encoded)
                loaded = zt.parse_table(data)
                assert loaded.checksum == encoded.checksum
                np.testing.assert_array_equal(loaded.centroids, encoded.centroids)
                seconds = load_seconds(data)
        if codecs is None:
            seconds = load_seconds(data)
        agree = agreement(table, encoded, sigs, np.random.default_rng(0))
        line = (f"{name:<24} {len(data):>10,} {len(data) / 2**20:>6.2f} "
                f"{'yes' if len(data) < CONFIGMAP_LIMIT else 'NO':>5} {seconds * 1e3:>8.1f} "
                f"{agree['zone_of']:>8.4f} {agree['band']:>7.4f} {agree['pick']:>7.4f} "
                f"{agree['max_abs_sim_err']:>8.1e}")
        if texts:
            line += f" {predictor_agreement(table, encoded, texts):>6.3f}"
        print(line, flush=True)


def esft(path: Path, k: int) -> tuple[zt.ZoneTable, np.ndarray]:
    from zones.fit import FitOptions, fit_zones
    from zones.inputs import load_inputs

    calib = load_inputs([path])
    table, _ = fit_zones(calib, [f"decode-{i}" for i in range(k)], FitOptions())
    prompt_sigs, ok = table.spec.build_many(calib.signature_counts)
    sigs = [prompt_sigs[ok]]
    if calib.decode_counts is not None:
        decode_sigs, ok_d = table.spec.build_many(calib.decode_counts)
        sigs.append(decode_sigs[ok_d])
    return table, np.concatenate(sigs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zones", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    default_trace = (Path(__file__).resolve().parents[2] / "shared" / "data"
                     / "esft_routing_shared.npz")
    parser.add_argument("--trace", type=Path, default=default_trace)
    args = parser.parse_args()

    start = time.perf_counter()
    table, sigs, texts = synthetic(args.zones, args.seed)
    print(f"(built the synthetic table in {time.perf_counter() - start:.1f}s)")
    compare("synthetic Qwen3-30B-A3B, all 48 layers", table, sigs, texts)
    if args.trace.is_file():
        for k in (4, 8):
            real, real_sigs = esft(args.trace, k)
            compare(f"real ESFT DeepSeek-V2-Lite, zones fit defaults, K={k}", real, real_sigs,
                    None)
    else:
        print(f"(no ESFT trace at {args.trace}: real-data part skipped)")


if __name__ == "__main__":
    main()
