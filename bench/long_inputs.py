"""Long inputs (issue 24): retrieval quality and throughput of ``long: pool`` against ``truncate``.

    .venv/bin/python bench/long_inputs.py [--model NAME|DIR] [--variant int8] [--words 40]
                                          [--overlap 32] [--rounds 3] [--threads N] [--json FILE]

``--model`` as in ``bench/engine.py`` (a name: its bundle in ``$EMBEDFLEET_HOME/models/NAME``; a
path with a ``/``: a bundle directory); default all-MiniLM-L6-v2. The engine is the worker's:
``Embedder.from_bundle`` with ``--variant`` (default int8, the worker's CPU default) and the
physical cores as threads, length-sorted batches of 32 cut by the 2048-token budget.

Every corpus doc (``shared/corpus/docs.jsonl``) gets two vectors, as the worker computes them:

* truncate: the doc embedded as is (the model reads its first max_tokens tokens);
* pool: the doc split into word-aligned windows of the model's tokens, overlapping by ``--overlap``
  tokens (``Embedder.windows``), each window's text embedded as a text of its own, and the windows'
  token-weighted mean, re-normalised (``worker.pipeline.pool_windows``, weights = the windows'
  token counts). A doc that fits is one window, the whole text: the same vector in both modes.

Quality (retrieval): for every LONG doc (more than one window), two queries that are pieces of the
doc itself, the doc left intact: its first "paragraph" and its last "paragraph" (the docs have no
blank lines: the first and the last ``--words`` whitespace-separated words, cut from the original
text). The index is all the docs under one mode; exact cosine search in numpy; recall@10 (and @1)
is the share of queries whose own doc ranks in the top 10 (1). The queries are embedded once (truncate:
the odd one longer than the model is cut) and searched against both indexes.

Throughput: the long docs only, under each mode, the same engine, ``--rounds`` interleaved rounds
(medians; within a round the modes alternate every 32 docs, so a busy neighbour slows both alike):
docs/s, and tokens/s where tokens are the tokens the model read (truncate: each doc's truncated
count; pool: the windows' counts, overlaps counted twice), including tokenization, windowing and
pooling.

Targets (PASS/FAIL):

* last-paragraph recall@10: pool >= truncate + 0.10 -- truncate never reads the end of a long doc,
  so this is where pool must earn its keep; it fails if pool does not find the ends markedly
  better (e.g. a pooled vector that drowns the last window, or windows that drop the tail);
* first-paragraph recall@10: pool >= truncate - 0.05 -- the start is all truncate reads, so pool
  may lose a little there (the first window is only part of the mean), not much;
* pool tokens/s >= 0.8 x truncate tokens/s -- per token read, windows must cost about what
  truncated docs cost (the same engine and batching; the windowing's second tokenization and the
  pooling are the overhead allowed).

Measured (all-MiniLM-L6-v2, int8, AMD EPYC, 2 cores shared with other jobs; 107 long docs of 2 to 3
windows): recall@10 first 1.000 / 1.000 and last 0.850 / 0.981 (truncate / pool), recall@1 first
0.935 / 0.879 and last 0.439 / 0.720; pool / truncate tokens/s 0.95x (docs/s 0.61x, 1.56x the
tokens read). The issue's targets stand: the last-paragraph gain (+0.13) clears +0.10 by 3 docs'
worth and would fail with a weaker pooling; first-paragraph recall@10 is at its ceiling in both
modes, so that target is a guard (it fails if pooling loses more than 5 of the 107 starts; the
cost shows at recall@1, -0.06, which is printed, not gated); tokens/s has room over 0.8 but fails
if windowing or pooling costs a fifth of the model's time. On a busy machine the tokens/s ratio
moves by about +-0.15 from round to round.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.commands.model import shared_dir  # noqa: E402
from worker.config import bundle_model_name, model_or_bundle  # noqa: E402
from worker.engine.bundle import default_bundle_dir  # noqa: E402
from worker.engine.cpu import read_cpu  # noqa: E402
from worker.engine.embedder import Embedder, physical_cpu_count  # noqa: E402
from worker.engine.quality import read_jsonl_strings  # noqa: E402
from worker.pipeline import pool_windows  # noqa: E402

BATCH_SIZE = 32
TOKEN_BUDGET = 2048  # the engine's default per model call
SLICE = 32  # long docs per timed piece: the modes alternate piece by piece (a shared machine's noise
# lands on both), and 32 docs make whole batches of 8 truncated docs
FloatArray = npt.NDArray[np.float32]


@dataclass
class Modes:
    """Every doc's vector under truncate and pool, and the tokens the model read for each."""

    truncate: FloatArray
    pool: FloatArray
    truncate_tokens: list[int]
    pool_tokens: list[int]
    windows: list[int]  # windows per doc (1: the doc fits)


def embed_truncate(embedder: Embedder, docs: Sequence[str]) -> tuple[FloatArray, list[int]]:
    output = embedder.embed(docs, batch_size=BATCH_SIZE, token_budget=TOKEN_BUDGET)
    return output.vectors, output.token_counts


def embed_pool(
    embedder: Embedder, docs: Sequence[str], overlap: int
) -> tuple[FloatArray, list[int], list[int]]:
    """``long: pool`` as the worker answers it: windows, each window embedded as a text (all the
    docs' windows in one call, as a batch of requests would be), the token-weighted mean."""
    texts: list[str] = []
    owners: list[int] = []
    for index, doc in enumerate(docs):
        spans = embedder.windows(doc, None, overlap)
        texts.extend(doc[span.start : span.end] for span in spans)
        owners.extend([index] * len(spans))
    output = embedder.embed(texts, batch_size=BATCH_SIZE, token_budget=TOKEN_BUDGET)
    counts = np.asarray(output.token_counts, dtype=np.float64)
    owner = np.asarray(owners)
    vectors = np.zeros((len(docs), embedder.dim), dtype=np.float32)
    tokens: list[int] = []
    windows: list[int] = []
    for index in range(len(docs)):
        rows = np.flatnonzero(owner == index)
        vectors[index] = pool_windows(list(output.vectors[rows]), counts[rows])
        tokens.append(int(counts[rows].sum()))
        windows.append(len(rows))
    return vectors, tokens, windows


def paragraphs(doc: str, words: int) -> tuple[str, str]:
    """The doc's first and last ``words`` words, as they stand in the doc (its own whitespace)."""
    found = list(re.finditer(r"\S+", doc))
    take = min(words, len(found))
    return doc[: found[take - 1].end()], doc[found[-take].start() :]


def recall(queries: FloatArray, index: FloatArray, right: npt.NDArray[np.int64], k: int) -> float:
    """Share of queries whose right doc is among the ``k`` nearest (cosine; unit vectors)."""
    scores = queries @ index.T
    own = scores[np.arange(len(right)), right]
    better = (scores > own[:, None]).sum(axis=1)  # ties count for the right doc
    return float((better < k).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        type=model_or_bundle,
        default=None,
        help="model name (its bundle in $EMBEDFLEET_HOME/models/NAME) or bundle directory (a path with a /)",
    )
    parser.add_argument("--variant", default="int8", help="bundle variant (default int8, the worker's)")
    parser.add_argument("--words", type=int, default=40, help="words per first/last-paragraph query")
    parser.add_argument("--overlap", type=int, default=32, help="tokens consecutive windows share")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.words < 1:
        parser.error("--words must be at least 1")
    model = args.model or default_bundle_dir()
    if not (model / "manifest.json").exists():
        print(
            f"error: no model bundle at {model}: run `make model MODEL={model.name}` first", file=sys.stderr
        )
        return 2
    threads = args.threads or physical_cpu_count()
    cpu = read_cpu()
    print(f"CPU: {cpu.model}, {cpu.cores} logical cores; {', '.join(cpu.reported_flags) or 'no AVX2'}")
    docs = read_jsonl_strings(shared_dir() / "corpus" / "docs.jsonl")
    embedder = Embedder.from_bundle(model, variant=args.variant, intra_op_threads=threads)
    model_name = bundle_model_name(model)

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    # Quality: both modes over every doc.
    started = time.perf_counter()
    truncate, truncate_tokens = embed_truncate(embedder, docs)
    progress(f"truncate: {len(docs)} docs embedded ({time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    pooled, pool_tokens, windows = embed_pool(embedder, docs, args.overlap)
    progress(f"pool: {sum(windows)} windows embedded ({time.perf_counter() - started:.1f} s)")
    modes = Modes(truncate, pooled, truncate_tokens, pool_tokens, windows)
    long_ids = np.asarray([i for i, n in enumerate(modes.windows) if n > 1], dtype=np.int64)
    if len(long_ids) == 0:
        print("error: no doc is longer than the model's window", file=sys.stderr)
        return 2
    short = np.asarray([i for i, n in enumerate(modes.windows) if n == 1], dtype=np.int64)
    same = float((modes.truncate[short] * modes.pool[short]).sum(axis=1).min()) if len(short) else 1.0
    firsts, lasts = zip(*(paragraphs(docs[i], args.words) for i in long_ids), strict=True)
    queries = embedder.embed([*firsts, *lasts], batch_size=BATCH_SIZE, token_budget=TOKEN_BUDGET)
    first_q, last_q = queries.vectors[: len(long_ids)], queries.vectors[len(long_ids) :]
    query_truncated = sum(queries.truncated)
    quality: dict[str, dict[str, float]] = {}
    for mode, index in (("truncate", modes.truncate), ("pool", modes.pool)):
        quality[mode] = {
            f"{part}_recall@{k}": recall(q, index, long_ids, k)
            for part, q in (("first", first_q), ("last", last_q))
            for k in (10, 1)
        }
    progress("recall computed")

    # Throughput: the long docs under each mode, interleaved rounds.
    long_docs = [docs[i] for i in long_ids]
    rates: dict[str, dict[str, list[float]]] = {
        mode: {"docs_per_s": [], "tokens_per_s": []} for mode in ("truncate", "pool")
    }
    embed_truncate(embedder, long_docs[:16])  # warm-up (the quality pass warmed the rest)
    for round_ in range(args.rounds):
        seconds = {"truncate": 0.0, "pool": 0.0}
        tokens = {"truncate": 0, "pool": 0}
        for start in range(0, len(long_docs), SLICE):  # the modes alternate slice by slice
            part = long_docs[start : start + SLICE]
            for mode in ("truncate", "pool"):
                started = time.perf_counter()
                if mode == "truncate":
                    _, counts = embed_truncate(embedder, part)
                else:
                    _, counts, _ = embed_pool(embedder, part, args.overlap)
                seconds[mode] += time.perf_counter() - started
                tokens[mode] += sum(counts)
        for mode in ("truncate", "pool"):
            rates[mode]["docs_per_s"].append(len(long_docs) / seconds[mode])
            rates[mode]["tokens_per_s"].append(tokens[mode] / seconds[mode])
        progress(f"round {round_ + 1} of {args.rounds} done")
    median = {mode: {k: statistics.median(v) for k, v in r.items()} for mode, r in rates.items()}
    tokens_read = {
        "truncate": sum(modes.truncate_tokens[i] for i in long_ids),
        "pool": sum(modes.pool_tokens[i] for i in long_ids),
    }

    window_counts = [modes.windows[i] for i in long_ids]
    print(
        f"\nmodel {model_name} ({model}), variant {embedder.variant} ({embedder.kernel}); {threads} threads; "
        f"{len(docs)} docs, {len(long_ids)} long (more than one window: {min(window_counts)} to "
        f"{max(window_counts)} windows, {sum(window_counts)} in all; overlap {args.overlap} tokens)"
    )
    print(
        f"queries: each long doc's first and last {args.words} words ({query_truncated} of "
        f"{2 * len(long_ids)} truncated); index: all {len(docs)} docs; exact cosine search. Short docs: "
        f"lowest cosine truncate/pool {same:.6f} (the same vector)"
    )
    print(
        "\n| mode | first paragraph recall@10 | last paragraph recall@10 "
        "| first paragraph recall@1 | last paragraph recall@1 | long docs |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for mode in ("truncate", "pool"):
        q = quality[mode]
        print(
            f"| {mode} | {q['first_recall@10']:.3f} | {q['last_recall@10']:.3f} "
            f"| {q['first_recall@1']:.3f} | {q['last_recall@1']:.3f} | {len(long_ids)} |"
        )

    print(
        f"\nthroughput, the {len(long_ids)} long docs, medians of {args.rounds} interleaved rounds "
        "(tokens: those the model read, with tokenization, windowing and pooling):"
    )
    print("\n| mode | docs/s | tokens/s | tokens read |")
    print("|---|---:|---:|---:|")
    for mode in ("truncate", "pool"):
        print(
            f"| {mode} | {median[mode]['docs_per_s']:.1f} | {median[mode]['tokens_per_s']:.0f} "
            f"| {tokens_read[mode]} |"
        )
    tokens_ratio = median["pool"]["tokens_per_s"] / median["truncate"]["tokens_per_s"]
    docs_ratio = median["pool"]["docs_per_s"] / median["truncate"]["docs_per_s"]
    print(f"pool / truncate: tokens/s {tokens_ratio:.2f}x, docs/s {docs_ratio:.2f}x")

    t, p = quality["truncate"], quality["pool"]
    checks = [
        (
            "last-paragraph recall@10: pool >= truncate + 0.10",
            p["last_recall@10"],
            t["last_recall@10"] + 0.10,
        ),
        (
            "first-paragraph recall@10: pool >= truncate - 0.05",
            p["first_recall@10"],
            t["first_recall@10"] - 0.05,
        ),
        ("pool tokens/s >= 0.8 x truncate tokens/s", tokens_ratio, 0.8),
    ]
    print()
    for label, value, target in checks:
        verdict = "PASS" if value >= target else "FAIL"
        print(f"{verdict}  {label}: {value:.3f} (target >= {target:.3f})")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "cpu": {"model": cpu.model, "cores": cpu.cores, "flags": cpu.reported_flags},
            "model": model_name,
            "variant": embedder.variant,
            "kernel": embedder.kernel,
            "threads": threads,
            "words": args.words,
            "overlap": args.overlap,
            "docs": len(docs),
            "long_docs": len(long_ids),
            "windows": sum(window_counts),
            "quality": quality,
            "throughput": rates,
            "throughput_median": median,
            "tokens_read": tokens_read,
            "checks": [
                {"label": label, "value": value, "target": target, "pass": value >= target}
                for label, value, target in checks
            ],
        }
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
