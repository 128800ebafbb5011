"""Incremental labeling: labeling after adding 10 % new documents vs a full labeling.

Both sides run in this one process with the pipeline's own code (``tasks.prepare.run`` and
``tasks.label.label_train_blocks``, one local Ray, the same actor pool settings), with a
fixed tokenizer and a fixed teacher (as a real user has): ``full`` labels every train block
of the grown corpus into an empty label folder; ``incremental`` starts from the labels of
the corpus before the new documents and labels what is missing; ``one block`` labels a single
missing block through the actor pool (the fixed cost of a pool run: its start, loading the
teacher). The incremental run is timed twice: as the stage runs it (few pending blocks are
labeled in-process, ``label.inline_blocks``) and forced through the actor pool
(``inline_blocks = 0``). Prints the median times, the blocks labeled by each, the ratios
(goal ≤ 0.15) and the pool's ratio without its fixed cost.

    python benchmarks/label_incremental.py              # ~120 stdlib files, embedded-default teacher
    python benchmarks/label_incremental.py --docs 60 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distill.config import ModelConfig, build_config
from distill.corpus import stdlib_files
from distill.models import build_llama, model_fingerprint, save_model
from distill.raylocal import init_ray
from distill.tokenizer import train_bpe
from tasks.common import LABELS, PREPARED, TEACHER_DIR


def write_corpus(folder: Path, files: list[Path], max_chars: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        text = path.read_text(encoding="utf-8", errors="replace")
        (folder / f"doc{i:04d}.txt").write_text(text[:max_chars])


def prepare(cfg, corpus: Path, dest: Path) -> dict:
    """The prepare stage on ``corpus``, its output kept under ``dest``."""
    from tasks.prepare import run

    cfg = build_config({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "source": str(corpus)}})
    manifest = run(cfg)
    shutil.copytree(PREPARED, dest)
    return manifest


def use_prepared(src: Path) -> None:
    shutil.rmtree(PREPARED, ignore_errors=True)
    shutil.copytree(src, PREPARED)


def drop_one_label(cfg, teacher: dict, manifest: dict) -> None:
    """Remove one block's label (compacting its shard): the next run has one block to label."""
    from distill.labels import compact_shard, index_label_shards, settings_for_run

    settings = settings_for_run(cfg.distill.top_k, cfg.distill.temperature, teacher, manifest)
    index, _ = index_label_shards(LABELS, settings)
    name = max(index, key=lambda n: len(index[n]))
    compact_shard(LABELS, name, index[name][:-1], settings)


def timed_labeling(cfg, teacher: dict, manifest: dict) -> tuple[float, int]:
    from tasks.label import label_train_blocks

    t0 = time.perf_counter()
    result = label_train_blocks(cfg, LABELS, teacher, manifest)
    return time.perf_counter() - t0, result["labeled_now"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=120, help="documents before the 10 %% are added")
    p.add_argument("--new-fraction", type=float, default=0.10)
    p.add_argument("--max-chars", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    args = p.parse_args()

    files = sorted(stdlib_files())
    extra = max(1, round(args.docs * args.new_fraction))
    old_files, all_files = files[:args.docs], files[:args.docs + extra]
    root = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    os.chdir(root)
    try:
        write_corpus(root / "corpus-old", old_files, args.max_chars)
        write_corpus(root / "corpus-new", all_files, args.max_chars)
        tok = train_bpe([f.read_text() for f in sorted((root / "corpus-old").iterdir())], 2048,
                        root / "tokenizer")
        base = build_config({"data": {"tokenizer": str(root / "tokenizer"), "max_documents": 0,
                                      "max_doc_chars": args.max_chars, "val_fraction": 0.05},
                             "label": {"batch_size": 32, "num_actors": 1}})
        shape = ModelConfig(layers=args.layers, d_model=args.d_model, heads=max(1, args.d_model // 64))
        model = build_llama(shape, len(tok), base.data.block_size, seed=0, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id)
        save_model(model, tok, TEACHER_DIR)
        teacher = {"fingerprint": model_fingerprint(TEACHER_DIR)}
        old = prepare(base, root / "corpus-old", root / "prepared-old")
        new = prepare(base, root / "corpus-new", root / "prepared-new")
        pool = build_config({**base.to_dict(), "label": {**base.to_dict()["label"], "inline_blocks": 0}})
        init_ray(base.ray)
        times: dict[str, list[float]] = {"full": [], "inline": [], "pool": [], "one": []}
        counts = set()
        for r in range(args.repeats):
            shutil.rmtree(LABELS, ignore_errors=True)
            use_prepared(root / "prepared-new")
            t_full, n_full = timed_labeling(pool, teacher, new)
            drop_one_label(base, teacher, new)
            t_one, _ = timed_labeling(pool, teacher, new)
            if r == 0:  # the labels before the new documents (untimed), kept for every repeat
                shutil.rmtree(LABELS)
                use_prepared(root / "prepared-old")
                timed_labeling(pool, teacher, old)
                shutil.copytree(LABELS, root / "labels-old")
            use_prepared(root / "prepared-new")
            incremental = {}
            for name, cfg in (("inline", base), ("pool", pool)):
                shutil.rmtree(LABELS)
                shutil.copytree(root / "labels-old", LABELS)
                incremental[name] = timed_labeling(cfg, teacher, new)
            for name, t in (("full", t_full), ("one", t_one), *((k, v[0]) for k, v in incremental.items())):
                times[name].append(t)
            counts.add((n_full, incremental["inline"][1], incremental["pool"][1]))
            print(f"repeat {r + 1}: full {t_full:.1f} s ({n_full} blocks), incremental in-process "
                  f"{incremental['inline'][0]:.1f} s / through the actor pool {incremental['pool'][0]:.1f} s "
                  f"({incremental['inline'][1]} blocks), one block through the pool {t_one:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        (n_full, n_incr, n_pool), = counts
        assert n_incr == n_pool, "both incremental runs must label the same blocks"
        print(f"{args.docs} + {extra} documents, {n_full} train blocks of {base.data.block_size}; teacher "
              f"{args.layers}x{args.d_model}, vocab {len(tok)}, CPU, 1 actor, "
              f"label.inline_blocks = {base.label.inline_blocks}")
        print(f"full labeling {med['full']:.1f} s ({n_full} blocks, actor pool); after +{extra} documents "
              f"{n_incr} blocks ({n_incr / n_full:.1%}):")
        print(f"  in-process (default): {med['inline']:.1f} s, time ratio {med['inline'] / med['full']:.3f} "
              f"(goal <= 0.15)")
        print(f"  through the actor pool: {med['pool']:.1f} s, time ratio {med['pool'] / med['full']:.3f}; "
              f"fixed cost of a pool run (one block) {med['one']:.1f} s, without it "
              f"{(med['pool'] - med['one']) / (med['full'] - med['one']):.3f}")
    finally:
        os.chdir("/")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
