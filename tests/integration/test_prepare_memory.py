"""``prepare`` streams: its peak memory on a 200 MB corpus stays under a fixed bound."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# The bound: the in-memory prepare this replaced needed ~130 bytes per token (~13 GB here: 100 M tokens).
# What remains is the interpreter with tokenizers/pyarrow (~250 MB), the tokenizer sample
# (20 MB of text) and its BPE training, a partition of the corpus, the hashes and the index.
# The goal for a corpus of any size is 1.5 GB. Measured here 442, 498 and (in a full
# suite run beside a `make run`) 1113 MB: the spread is not explained yet (the tokenizer's
# threads' allocations are the suspect), so the bound is the goal, not the best run.
PEAK_RSS_MB = 1500


def write_word_corpus(folder: Path, megabytes: int) -> int:
    """The benchmark's seeded corpus (``benchmarks/prepare_scale.py``): one generator, so the
    bound here and the figures there are about the same text."""
    spec = importlib.util.spec_from_file_location("prepare_scale", ROOT / "benchmarks" / "prepare_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_word_corpus(folder, megabytes)


def test_peak_memory_of_prepare_on_200_mb(tmp_path):
    size = write_word_corpus(tmp_path / "corpus", 200)
    assert size >= 200_000_000
    script = (
        "import json, resource, sys\n"
        "from pathlib import Path\n"
        "from distill.config import build_config\n"
        "from tasks.prepare import run\n"
        f"cfg = build_config({{'data': {{'source': {str(tmp_path / 'corpus')!r}, 'engine': 'local'}}}})\n"
        f"m = run(cfg, Path({str(tmp_path / 'prepared')!r}))\n"
        "print(json.dumps({'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "                  'chars': m['corpus']['chars'], 'train': m['splits']['train']['tokens']}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["chars"] >= 199_000_000          # all of it arrived
    assert result["train"] > 30_000_000            # and was tokenised
    assert result["rss_mb"] < PEAK_RSS_MB, result
