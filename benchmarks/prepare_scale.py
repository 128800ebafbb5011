"""Prepare at scale: wall time, MB/s and peak RSS of ``prepare`` (in-process and Ray Data
engines) on generated corpora of 10 MB, 100 MB and 1 GB, against the tokenizer's own
batch-encode throughput on the same text (the limit of tokenise-and-pack).

Each corpus is generated deterministically (seeded word list: a fifth of it in four big
files that prepare cuts into pieces, the rest in 100 kB files). Each prepare runs in a
subprocess of its own so that its peak RSS is its own; for the Ray engine
that is the driver's, and the Ray workers' peak (sampled) is printed beside it. The raw
encode runs in this process with the tokenizer that prepare trained, over the corpus's
files in batches (the Rust encoder's threads, as in the in-process engine). Peak RSS is
the subprocess's own ``VmHWM``: its ``ru_maxrss`` would start at this process's peak
(Linux carries it over fork + exec), which the raw encode raises to ~1 GB.

    python benchmarks/prepare_scale.py                     # 10 and 100 MB, both engines
    python benchmarks/prepare_scale.py --sizes 10 100 1000 --engines local ray
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN_PREPARE = """
import json, sys
from pathlib import Path
from distill.config import build_config
from tasks.prepare import peak_rss_mb, run
cfg = build_config({"data": {"source": sys.argv[1], "engine": sys.argv[3]}})
m = run(cfg, Path(sys.argv[2]))
print("RESULT " + json.dumps({"rss_mb": peak_rss_mb(),
                              "chars": m["corpus"]["chars"],
                              "tokens": sum(s["tokens"] for s in m["splits"].values())}))
"""


def write_word_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """A seeded corpus of about ``megabytes`` MB (four big files holding a fifth, the rest
    in 100 kB files); returns its size in bytes."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(5000)]
    folder.mkdir(parents=True)
    total, target, i = 0, megabytes * 1_000_000, 0
    while total < target:
        size = target // 20 if i < 4 else 100_000
        lines, n = [], 0
        while n < size:
            line = " ".join(rng.choices(words, k=rng.randint(3, 15)))
            lines.append(line + ("\n\n" if rng.random() < 0.2 else "\n"))
            n += len(line) + 1
        data = "".join(lines).encode()
        (folder / f"f{i:05d}.txt").write_bytes(data)
        total, i = total + len(data), i + 1
    return total


class WorkerPeak:
    """Samples the summed RSS of the processes below ``pid`` (the local Ray that a prepare
    starts: its GCS, raylet and workers), not counting ``pid`` itself."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self):
        import psutil

        while not self.stop.wait(0.5):
            total = 0
            try:
                children = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                try:
                    total += child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)


def run_prepare(corpus: Path, out: Path, engine: str) -> dict:
    """One prepare in a subprocess: wall time, its peak RSS, phase times."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUN_PREPARE, str(corpus), str(out), engine],
                            cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    with WorkerPeak(proc.pid) as workers:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"prepare ({engine}) failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
    phases = dict(re.findall(r"(\w+) ([\d.]+)", stdout.split("prepare seconds: ", 1)[1].splitlines()[0]))
    peaks = dict(re.findall(r"(\w+) ([\d.]+)", stdout.split("prepare peak RSS MB: ", 1)[1].splitlines()[0]))
    return {**result, "wall_s": wall, "phases": {k: float(v) for k, v in phases.items()},
            "phase_peak_mb": {k: float(v) for k, v in peaks.items()},
            "ray_workers_mb": workers.peak / 2**20}


def raw_encode_mb_s(corpus: Path, tokenizer_dir: Path, sample_mb: int = 0,
                    batch_bytes: int = 8_000_000) -> float:
    """The tokenizer's own batch-encode rate, MB/s, over the corpus text (files in batches
    of ~8 MB; the first ``sample_mb`` MB of files if set: a rate needs no more)."""
    from distill.tokenizer import encode_texts, encoder_json, load_tokenizer

    tok_json = encoder_json(load_tokenizer(tokenizer_dir))
    encode_texts(tok_json, ["warm up"])
    seconds, batch, size, done = 0.0, [], 0, 0
    files = sorted(corpus.iterdir())
    for i, path in enumerate(files):
        text = path.read_text()
        # big files in 200 000-character pieces, as prepare sees them (one huge string
        # would use a single thread)
        batch += [text[j:j + 200_000] for j in range(0, len(text), 200_000)]
        size += len(text.encode())
        last = i == len(files) - 1 or (sample_mb and done + size >= sample_mb * 1e6)
        if size >= batch_bytes or last:
            t0 = time.perf_counter()
            encode_texts(tok_json, batch)
            seconds += time.perf_counter() - t0
            done, batch, size = done + size, [], 0
        if last:
            return done / 1e6 / seconds
    return done / 1e6 / seconds


def interleaved_pack_vs_raw(corpus: Path, tokenizer_dir: Path, sample_mb: int = 10,
                            repeats: int = 3) -> dict:
    """Tokenise-and-pack against the raw batch encode on the same batches, in this process,
    alternating which goes first (so machine load weighs on both alike): the first
    ``sample_mb`` MB of the corpus in prepare's pieces and batches (``data.batch_chars``),
    each side timed ``repeats`` times per batch (median). Packing is the whole per-document
    work of the local engine: :func:`tokenise_and_pack` and the shard writer."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from distill.blocks import DOCUMENT_SCHEMA, StableBlockWriter, iter_packed_rows, tokenise_and_pack
    from distill.config import build_config
    from distill.corpus import split_text
    from distill.tokenizer import encode_texts, encoder_json, load_tokenizer

    d = build_config({}).data
    tok = load_tokenizer(tokenizer_dir)
    tok_json, eos = encoder_json(tok), tok.eos_token_id
    encode_texts(tok_json, ["warm up"])
    batches, batch, chars, total = [], [], 0, 0
    for path in sorted(corpus.iterdir()):
        for offset, piece in split_text(path.read_text(), d.max_doc_chars):
            batch.append((hashlib.sha256(piece.encode()).hexdigest(), str(path), offset, "train", piece))
            chars += len(piece)
            if chars >= d.batch_chars:
                batches.append(sorted(batch))
                total, batch, chars = total + chars, [], 0
        if total >= sample_mb * 1e6:
            break
    raw_s, pack_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for b, rows in enumerate(batches):
            texts = [r[4] for r in rows]
            table = pa.table(dict(zip(DOCUMENT_SCHEMA.names, map(list, zip(*rows)))), schema=DOCUMENT_SCHEMA)

            def raw():
                encode_texts(tok_json, texts)

            def pack():
                writer = StableBlockWriter(Path(tmp) / f"out{b}", d.block_size, d.shard_blocks,
                                           d.tail_buckets, Path(tmp) / f"spill{b}")
                for row, full, tail in iter_packed_rows(tokenise_and_pack(table, tok_json, eos, d.block_size),
                                                        d.block_size):
                    writer.add_document(row["sha"], full, tail)
                writer.finish()
                shutil.rmtree(Path(tmp) / f"out{b}")

            times = {raw: [], pack: []}
            for k in range(repeats):
                for fn in ((raw, pack) if (b + k) % 2 == 0 else (pack, raw)):
                    t0 = time.perf_counter()
                    fn()
                    times[fn].append(time.perf_counter() - t0)
            raw_s.append(float(np.median(times[raw])))
            pack_s.append(float(np.median(times[pack])))
    mb = total / 1e6
    return {"mb": mb, "raw_mb_s": mb / sum(raw_s), "pack_mb_s": mb / sum(pack_s),
            "ratio": sum(raw_s) / sum(pack_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="corpus sizes, MB")
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--raw-sample-mb", type=int, default=0,
                        help="measure the raw encode rate on this many MB of the corpus (0 = all)")
    parser.add_argument("--interleaved-mb", type=int, default=10,
                        help="MB of the corpus for the interleaved pack-vs-raw measurement (0 = skip)")
    parser.add_argument("--workdir", default="", help="where corpora and outputs go (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prepare-scale-"))
    print(f"{os.cpu_count()} CPUs; work dir {work}")
    print(f"{'MB':>6} {'engine':>6} {'wall s':>8} {'MB/s':>7} {'peak RSS MB':>12} {'Ray procs MB':>13} "
          f"{'pack s':>7} {'pack MB/s':>10} {'raw encode MB/s':>16} {'pack/raw':>9}")
    try:
        for mb in args.sizes:
            corpus = work / f"corpus-{mb}"
            size = write_word_corpus(corpus, mb)
            raw = None
            for engine in args.engines:
                out = work / f"prepared-{mb}-{engine}"
                r = run_prepare(corpus, out, engine)
                if raw is None:
                    raw = raw_encode_mb_s(corpus, out / "tokenizer", args.raw_sample_mb)
                pack = r["phases"]["pack"]
                print(f"{size / 1e6:6.0f} {engine:>6} {r['wall_s']:8.1f} {size / 1e6 / r['wall_s']:7.2f} "
                      f"{r['rss_mb']:12.0f} {r['ray_workers_mb']:13.0f} {pack:7.1f} "
                      f"{size / 1e6 / pack:10.2f} {raw:16.2f} {size / 1e6 / pack / raw:9.2f}", flush=True)
                print(f"       phases (s): {r['phases']}; peak RSS at each phase's end (MB): "
                      f"{r['phase_peak_mb']}", flush=True)
                if engine == args.engines[0] and args.interleaved_mb:
                    inter = interleaved_pack_vs_raw(corpus, out / "tokenizer", args.interleaved_mb)
                    print(f"       interleaved in one process, {inter['mb']:.0f} MB: pack "
                          f"{inter['pack_mb_s']:.2f} MB/s, raw encode {inter['raw_mb_s']:.2f} MB/s, "
                          f"pack/raw {inter['ratio']:.2f}", flush=True)
                shutil.rmtree(out)
            shutil.rmtree(corpus)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
