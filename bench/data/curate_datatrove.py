"""Curation throughput (documents/s per core) and near-dedup recall: lmforge vs datatrove.

datatrove is the baseline, not a dependency of lmforge; install it (with spaCy, which datatrove's
English word tokenizer needs) into the venv first:

    .venv/bin/pip install datatrove spacy
    .venv/bin/python -m bench.data.curate_datatrove [--docs 20000] [--modes dedup full] [--no-record] [--out DIR]

One generated corpus of English-like documents (a seeded Zipf vocabulary plus real stop words)
with planted exact duplicates and planted near duplicates (0.5-3% of the words of a document
replaced, true 5-gram Jaccard measured) is curated, in this one process on one core, by:

  dedup     exact + MinHash near dedup only, the same settings on both sides: 5-word shingles,
            14 bands x 8 rows (112 permutations), seed 1; datatrove's exact-dedup and four
            MinHash stages vs lmforge's exact_dedup + near_dedup steps
  full      the whole curation pipeline: lmforge's default steps (cleaning, boilerplate, length,
            language ID, quality, PII, decontamination, exact + near dedup) vs datatrove's closest
            pipeline (FTFY, Gopher repetition + quality, C4 quality, PII, exact + MinHash dedup).
            datatrove's language filter needs a fastText model downloaded from a hub, which is not
            possible here, so datatrove does that much less work.

Recall = share of planted near-duplicate pairs (true Jaccard >= 0.8) left with one document;
false removals = share of the unique documents that dedup removed. Figures go to
OUT/curate_datatrove.jsonl through ``bench.common.record``. ``--tiny``: 200 documents, a check of
this script; without datatrove installed it runs lmforge's side alone and records no baseline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common.cli import add_common_arguments, choose, out_dir, run
from bench.common.record import command_line, record
from lmforge.core.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODES = ("dedup", "full")

STOP = ["the", "of", "and", "to", "a", "in", "that", "is", "with", "for", "it", "as", "was", "on", "be", "have"]
BANDS, ROWS, SHINGLE, THRESHOLD = 14, 8, 5, 0.8
VERIFY = True  # --no-verify: keep every LSH candidate, as datatrove does


def make_corpus(n: int, seed: int = 0) -> tuple[list[dict], list[tuple[str, str, float]], set[str]]:
    """(documents, planted near pairs (original id, copy id, true Jaccard), ids of unique documents)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "pa", "do", "fe", "gu", "ha", "ri", "bo"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(30000)})
    weights = [1 / (rank + 1) for rank in range(len(vocab))]

    def sentence() -> str:
        words = [rng.choice(STOP) if rng.random() < 0.35 else w
                 for w in rng.choices(vocab, weights, k=rng.randint(8, 18))]
        return " ".join(words).capitalize() + "."

    def document() -> str:
        paragraphs = [" ".join(sentence() for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(2, 4))]
        return "\n\n".join(paragraphs)

    base = [document() for _ in range(n)]
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(base)]
    pairs = []
    for i in rng.sample(range(n), n // 10):  # 10% get a near twin
        words = base[i].split(" ")
        # 0.5% to 3% of the words replaced: true Jaccard from about 0.95 down to below the threshold.
        for j in rng.sample(range(len(words)), max(1, int(len(words) * rng.uniform(0.005, 0.03)))):
            words[j] = rng.choice(vocab)
        copy = {"id": f"n{i}", "text": " ".join(words)}
        docs.append(copy)
        pairs.append((f"d{i}", copy["id"], _jaccard(base[i], copy["text"])))
    twins = {p[0] for p in pairs}
    for i in rng.sample([i for i in range(n) if f"d{i}" not in twins], n // 50):  # 2% exact copies
        docs.append({"id": f"e{i}", "text": base[i]})
    rng.shuffle(docs)
    unique = {f"d{i}" for i in range(n)} - twins - {d["id"].replace("e", "d") for d in docs if d["id"][0] == "e"}
    return docs, pairs, unique


def _jaccard(a: str, b: str) -> float:
    def shingles(text: str) -> set:
        words = text.lower().split()
        return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------- lmforge


def run_lmforge(docs: list[dict], work: Path, full: bool) -> tuple[float, set[str]]:
    from lmforge.config.curation import CurationConfig, LanguageConfig, NearDedupConfig
    from lmforge.core.workspace import Workspace
    from lmforge.data.documents import read_documents, text_id, write_documents
    from lmforge.stages.curate import curate

    ws = Workspace(work / ("ours-full" if full else "ours-dedup"))
    shards = 4
    for s in range(shards):
        rows = [{"id": text_id(d["text"] + d["id"]), "text": d["text"], "source": "bench", "uri": d["id"],
                 "title": d["id"], "fetched_at": "", "content_type": "text/plain", "meta": "{}"}
                for d in docs[s::shards]]
        write_documents(ws.raw_dir / f"docs-{s:05d}.parquet", rows)
    near = NearDedupConfig(shingle_size=SHINGLE, num_perm=BANDS * ROWS, bands=BANDS, rows=ROWS,
                           threshold=THRESHOLD, previous_versions=0, seed=1, verify=VERIFY)
    # The generated words are no real language: identify (the cost stays), keep every language.
    cfg = CurationConfig(near_dedup=near, language=LanguageConfig(keep=[], min_score=0)) if full else \
        CurationConfig(steps=["exact_dedup", "near_dedup"], near_dedup=near)
    started = time.perf_counter()
    curate(cfg, ws)
    seconds = time.perf_counter() - started
    kept = {row["uri"] for split in ("train", "validation")
            for row in read_documents(ws.curated_dir / f"{split}.parquet")}
    return seconds, kept


# ---------------------------------------------------------------- datatrove


def _patch_xxhash() -> None:
    """The xxhash build here refuses str (upstream encodes it in C); datatrove passes str: encode first."""
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    try:
        xxhash.xxh64_intdigest("probe")
    except TypeError:
        dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
        dt_xxhash.xxhash32 = lambda data: xxhash.xxh32_intdigest(data.encode() if isinstance(data, str) else data)


def doc_text(doc) -> bytes:
    return doc.text.encode("utf-8")


def run_datatrove(docs: list[dict], work: Path, full: bool) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    _patch_xxhash()
    root = work / ("dt-full" if full else "dt-dedup")
    (root / "input").mkdir(parents=True)
    with open(root / "input" / "docs.jsonl", "w") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    minhash = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=1)
    exact = ExactDedupConfig(content_getter=doc_text)

    def reader(folder: str):
        return JsonlReader(str(root / folder), glob_pattern="*.jsonl*")

    stages = []
    source = "input"
    if full:
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
        from datatrove.pipeline.formatters import FTFYFormatter, PIIFormatter

        stages.append([reader("input"), FTFYFormatter(), GopherRepetitionFilter(), GopherQualityFilter(),
                       C4QualityFilter(filter_no_terminal_punct=False), PIIFormatter(),
                       JsonlWriter(str(root / "filtered"), compression=None)])
        source = "filtered"
    stages += [
        [reader(source), ExactDedupSignature(str(root / "exact_sigs"), config=exact)],
        [ExactFindDedups(str(root / "exact_sigs"), str(root / "exact_dups"), config=exact)],
        [reader(source), ExactDedupFilter(str(root / "exact_dups"), config=exact),
         JsonlWriter(str(root / "exact_out"), compression=None)],
        [reader("exact_out"), MinhashDedupSignature(str(root / "sigs"), config=minhash)],
        [MinhashDedupBuckets(str(root / "sigs"), str(root / "buckets"), config=minhash)],
        [MinhashDedupCluster(str(root / "buckets"), str(root / "remove_ids"), config=minhash)],
        [reader("exact_out"), MinhashDedupFilter(str(root / "remove_ids")),
         JsonlWriter(str(root / "output"), compression=None)],
    ]
    started = time.perf_counter()
    for i, pipeline in enumerate(stages):
        # The bucket stage wants one task per band; workers=1 runs them one after another on one core.
        tasks = BANDS if isinstance(pipeline[0], MinhashDedupBuckets) else 1
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(root / f"logs{i}"),
                              skip_completed=False).run()
    seconds = time.perf_counter() - started
    kept = set()
    for path in (root / "output").glob("*.jsonl*"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            kept.update(json.loads(line)["id"] for line in fh)
    return seconds, kept


# ---------------------------------------------------------------- scoring


def score(kept: set[str], pairs: list, unique: set[str]) -> tuple[float, float]:
    """(recall on planted near pairs with Jaccard >= threshold, share of unique documents removed)."""
    eligible = [p for p in pairs if p[2] >= THRESHOLD]
    caught = sum(1 for a, b, _ in eligible if (a in kept) + (b in kept) <= 1)
    wrongly = sum(1 for u in unique if u not in kept)
    return caught / max(len(eligible), 1), wrongly / max(len(unique), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="base documents before planted copies "
                        "(default 20000; 200 with --tiny)")
    parser.add_argument("--no-record", action="store_true", help="print only; write no records")
    parser.add_argument("--modes", nargs="+", default=list(MODES), metavar="MODE", help=" ".join(MODES))
    parser.add_argument("--no-verify", action="store_true",
                        help="skip lmforge's candidate verification (datatrove has none): same rule on both sides")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    add_common_arguments(parser, "200 documents (lmforge's side alone without datatrove): a check of this script")
    args = parser.parse_args()
    modes = choose(args.modes, MODES, "mode", "--modes")
    args.docs = args.docs or (200 if args.tiny else 20000)
    global VERIFY
    VERIFY = not args.no_verify
    baseline_ok = _datatrove_ready(args.tiny)
    out = None if args.no_record else out_dir(args)
    docs, pairs, unique = make_corpus(args.docs, seed=args.seed)
    eligible = sum(1 for p in pairs if p[2] >= THRESHOLD)
    print(f"corpus: {len(docs)} documents, {len(pairs)} planted near pairs ({eligible} with Jaccard >= "
          f"{THRESHOLD}), {len(unique)} unique")
    command = command_line()
    label = "datatrove 0.10" if baseline_ok else "none: datatrove not installed (--tiny check)"
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            ours_s, ours_kept = run_lmforge(docs, Path(tmp), full=mode == "full")
            ours_rate = len(docs) / ours_s
            ours_recall, ours_false = score(ours_kept, pairs, unique)
            base = "datatrove not installed"
            base_rate = base_recall = base_kept_unique = None
            if baseline_ok:
                base_s, base_kept = run_datatrove(docs, Path(tmp), full=mode == "full")
                base_rate = round(len(docs) / base_s, 1)
                base_recall, base_false = score(base_kept, pairs, unique)
                base_kept_unique = round(1 - base_false, 4)
                base = (f"datatrove {base_rate:,.0f} docs/s (recall {base_recall:.4f}, false {base_false:.4f}, "
                        f"kept {len(base_kept)})")
            print(f"{mode}: lmforge {ours_rate:,.0f} docs/s (recall {ours_recall:.4f}, false {ours_false:.4f}, "
                  f"kept {len(ours_kept)}) | {base}")
            if out is not None:
                record("curate_datatrove", f"{mode}_docs_per_s_per_core", round(ours_rate, 1), "docs/s",
                       f"{label} (1 task, 1 worker)" if baseline_ok else label, base_rate, command=command,
                       out_dir=out)
                record("curate_datatrove", f"{mode}_near_dup_recall", round(ours_recall, 4), "fraction", label,
                       None if base_recall is None else round(base_recall, 4), command=command, out_dir=out)
                if mode == "dedup":  # in `full` the quality filters remove documents too
                    record("curate_datatrove", "dedup_unique_docs_kept", round(1 - ours_false, 4), "fraction",
                           label, base_kept_unique, command=command, out_dir=out)
    if out is not None:
        print(f"records in {out}")
    return 0


def _datatrove_ready(tiny: bool) -> bool:
    """Whether the baseline can run; without datatrove only a --tiny check goes on (lmforge's side alone)."""
    try:
        import datatrove  # noqa: F401 - imported only to learn whether the baseline is installed
        from loguru import logger
    except ImportError:
        if tiny:
            print("datatrove is not installed: lmforge's side only", file=sys.stderr)
            return False
        raise ConfigError("datatrove (the baseline) is not installed",
                          ".venv/bin/pip install datatrove spacy") from None
    logger.remove()  # datatrove logs every block's progress
    return True


if __name__ == "__main__":
    run(main)
