"""Index benchmark: Flat vs HNSW vs IVF-Flat vs IVF-PQ on clustered synthetic and real vectors.

Synthetic: a Gaussian mixture (cluster centres + isotropic noise, L2-normalised) so
neighbourhoods have the clumpy structure of real embeddings, with held-out queries from the
same mixture. Real: the student's image embeddings of the emoji set (queries: its caption
embeddings). Reports build time, index size in memory (serialised bytes), QPS (one batch of
queries, all threads) and recall@10 against exact Flat search. Target: an HNSW setting with
recall@10 >= 0.95 at >= 10x Flat's QPS.

The default size (200k) fits a few minutes on a 2-core box shared with training; pass
``--n 1000000`` for the full 1M run.

    nice -n 10 .venv/bin/python benchmarks/index.py [--n 1000000] [--emb EMB_DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import time
from typing import Any

import faiss
import numpy as np

from clipdistill.io import atomic_write_json
from clipdistill.serve.index import apply_search_params


def gaussian_mixture(n: int, dim: int, clusters: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 2.0))  # uneven cluster sizes, like real concepts

    def sample(count: int) -> np.ndarray:
        owner = rng.choice(clusters, size=count, p=weights)
        x = centres[owner] + noise * rng.standard_normal((count, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = np.concatenate([sample(min(100_000, n - i)) for i in range(0, n, 100_000)])
    return base, sample(1000)


def configs(n: int) -> list[tuple[str, dict[str, int]]]:
    """Index settings to compare. FAISS k-means wants >= 39 training points per centroid, so
    small sets get fewer IVF lists and no PQ (its 256-entry codebooks need ~10k points)."""
    nlist = min(int(2 ** round(math.log2(4 * math.sqrt(n)))), 2 ** int(math.log2(max(n // 39, 1))))
    out: list[tuple[str, dict[str, int]]] = [("Flat", {})]
    out += [("HNSW32", {"efSearch": ef}) for ef in (16, 32, 64, 128)]
    out += [(f"IVF{nlist},Flat", {"nprobe": p}) for p in (8, 32)]
    if n >= 39 * 256:
        out += [(f"IVF{nlist},PQ32", {"nprobe": p}) for p in (16, 64)]
    return out


def qps_and_ids(index: Any, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    index.search(queries[:10], k)  # warm-up
    started = time.perf_counter()
    _, ids = index.search(queries, k)
    return len(queries) / (time.perf_counter() - started), ids


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


def run_suite(name: str, base: np.ndarray, queries: np.ndarray, k: int = 10) -> list[dict[str, Any]]:
    dim = base.shape[1]
    rows: list[dict[str, Any]] = []
    built: dict[str, tuple[Any, float]] = {}
    truth = None
    flat_qps = None
    for factory, params in configs(len(base)):
        factory_eff = factory
        ivf_lists = int(factory[3:].split(",")[0]) if factory.startswith("IVF") else 0
        if ivf_lists and ivf_lists * 4 > len(base):  # too few vectors for this nlist: shrink it
            factory_eff = factory.replace(f"IVF{ivf_lists}", f"IVF{max(1, len(base) // 39)}")
        if factory_eff not in built:
            index = faiss.index_factory(dim, factory_eff, faiss.METRIC_INNER_PRODUCT)
            assert index.metric_type == faiss.METRIC_INNER_PRODUCT
            if factory_eff.startswith("HNSW"):
                faiss.downcast_index(index).hnsw.efConstruction = 80
            started = time.perf_counter()
            if not index.is_trained:
                index.train(base[: min(len(base), 256 * 1024)])
            index.add(base)
            built[factory_eff] = (index, time.perf_counter() - started)
        index, build_s = built[factory_eff]
        apply_search_params(index, ef_search=params.get("efSearch"), nprobe=params.get("nprobe"))
        qps, ids = qps_and_ids(index, queries, k)
        if truth is None:
            truth, flat_qps = ids, qps
        row = {
            "data": name,
            "factory": factory_eff,
            "params": params,
            "build_s": round(build_s, 2),
            "memory_mb": round(len(faiss.serialize_index(index)) / 1e6, 1),
            "qps": round(qps, 1),
            "speedup_vs_flat": round(qps / flat_qps, 2),
            "recall@10": round(recall(ids, truth), 4),
        }
        rows.append(row)
        print(
            f"| {name} | {factory_eff} | {params or ''} | {row['build_s']} | {row['memory_mb']} | "
            f"{row['qps']:.0f} | {row['speedup_vs_flat']}x | {row['recall@10']:.3f} |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="synthetic vectors (1000000 for the full run)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=1.0, help="per-dim noise std (centres are N(0, 1))")
    parser.add_argument("--emb", default=None, help="an embedding folder (clipdistill embed) for the real run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/index.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    print("| data | factory | search params | build s | memory MB | QPS | vs Flat | recall@10 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    base, queries = gaussian_mixture(args.n, args.dim, args.clusters, args.noise, seed=0)
    rows = run_suite(f"synthetic {args.n // 1000}k", base, queries)
    real_note = None
    if args.emb:
        from clipdistill.serve.embed import read_embeddings

        manifest, image, text, _ = read_embeddings(args.emb)
        real_note = f"{manifest['model']['spec']} on {manifest['dataset']['name']} ({manifest['count']} images)"
        rows += run_suite(f"real ({len(image)})", image.astype(np.float32), text.astype(np.float32))
    synthetic = [r for r in rows if not r["data"].startswith("real")]
    hnsw_ok = [r for r in synthetic if r["factory"].startswith("HNSW") and r["recall@10"] >= 0.95]
    target = any(r["speedup_vs_flat"] >= 10 for r in hnsw_ok)
    atomic_write_json(
        args.out,
        {
            "rows": rows,
            "synthetic": {
                "n": args.n,
                "dim": args.dim,
                "clusters": args.clusters,
                "noise": args.noise,
                "queries": 1000,
            },
            "real": real_note,
            "target_hnsw_recall_0.95_at_10x": target,
            "threads": args.threads,
            "machine": platform.processor() or platform.machine(),
            "faiss": faiss.__version__,
            "date": dt.datetime.now().isoformat(timespec="seconds"),
        },
    )
    print(f"\ntarget (HNSW recall@10 >= 0.95 at >= 10x Flat QPS, synthetic): {target}; wrote {args.out}")


if __name__ == "__main__":
    main()
