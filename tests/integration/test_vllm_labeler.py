"""vLLM's CPU build labels for real, against the HF backend on the same teacher.

One engine for the module (starting one costs 25-50 s here): the soft labeler owns it and the
hard-mode labelers share it (``VLLMLabeler.from_engine``), as one actor's labeler reuses its
engine across batches. The teacher is a random 2-layer Llama (d_model 128, 2 heads: head size
64, which vLLM's CPU attention takes; vocab 512, 64 positions = the block).

Tolerances (issue 14): top-k ids equal where the teacher has no near-tie, log-probs within
1e-4 and the rest mass's log within 1e-3 (both float32, before the label files' float16),
the teacher's NLL within 1e-5; greedy generations equal token for token.
"""

import json
import os
import time

import numpy as np
import pytest
import torch

from distill.config import ModelConfig
from distill.losses import topk_labels
from distill.models import build_llama, load_causal_lm
from distill.teachers.hf import HFLabeler

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm", reason="vLLM's CPU build is installed by `make test`")

VOCAB, BLOCK, K, PAD = 512, 64, 16, 0
TIE = 1e-4  # log-prob gap under which two candidates count as tied (either order is right)


def gen_settings(**over) -> str:
    return json.dumps({"prompt_tokens": 16, "max_new_tokens": 32, "sampling": "greedy",
                       "temperature": None, "top_p": None, "seed": None, **over})


def save_teacher(path, heads=2, seed=0):
    model = build_llama(ModelConfig(layers=2, d_model=128, heads=heads), VOCAB, BLOCK, seed=seed,
                        eos_id=1, pad_id=PAD)
    with torch.no_grad():  # spread the logits: few near-ties, rest mass well inside (0, 1)
        model.get_input_embeddings().weight.mul_(3)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("vllm-teacher"))


@pytest.fixture(scope="module")
def engine(teacher):
    """The module's one vLLM engine (a soft labeler), 1 GiB of KV cache, eager (no compile)."""
    from distill.teachers.vllm import VLLMLabeler

    labeler = VLLMLabeler(teacher, k=K, temperature=1.0, vocab_size=VOCAB, dtype="float32",
                          block_size=BLOCK, enforce_eager=True, kv_cache_gib=1)
    yield labeler
    labeler.close()


def hard_labeler(engine, mode, eos, **gen):
    from vllm import SamplingParams

    from distill.teachers.vllm import VLLMLabeler

    return VLLMLabeler.from_engine(engine.llm, None, K, VOCAB, max_model_len=engine.max_len,
                                   block_size=BLOCK, mode=mode, generation=gen_settings(**gen),
                                   eos_id=eos, pad_id=PAD, params_class=SamplingParams)


def hf_labeler(teacher, mode="soft", eos=None, **gen):
    return HFLabeler(teacher, k=K, temperature=1.0, vocab_size=VOCAB, block_size=BLOCK, mode=mode,
                     generation=gen_settings(**gen) if mode != "soft" else "", eos_id=eos,
                     pad_id=PAD)


def blocks(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"block_id": np.array([f"b{seed}-{i}" for i in range(n)]),
            "input_ids": rng.integers(2, VOCAB, (n, BLOCK)).astype(np.int32)}


def untied(logprobs_sorted: np.ndarray) -> np.ndarray:
    """[P, K+1] sorted log-probs → [P, K] mask of top-k slots whose id is determined (no
    near-tie with a neighbour, the (k+1)-th candidate included)."""
    gaps = -np.diff(logprobs_sorted, axis=1)  # [P, K]: gap below slot i
    tied_below = gaps < TIE
    tied_above = np.concatenate([np.zeros_like(tied_below[:, :1]), tied_below[:, :-1]], axis=1)
    return ~(tied_below | tied_above)


def test_soft_labels_equal_hf_within_tolerances(teacher, engine):
    from distill.teachers.vllm import prompt_logprobs_to_arrays

    batch = blocks()
    ids = batch["input_ids"].astype(np.int64)
    outputs = engine.llm.generate([{"prompt_token_ids": r.tolist()} for r in ids], engine.params,
                                  use_tqdm=False)
    model = load_causal_lm(teacher, False, torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids[:, :-1])).logits.float()
    for row, out, lg in zip(ids, outputs, logits):
        v_ids, v_lp, v_rest, v_nll = prompt_logprobs_to_arrays(out.prompt_logprobs, row, K, VOCAB)
        ref = topk_labels(lg, K, 1.0)
        logp = torch.log_softmax(lg, -1)
        determined = untied(torch.topk(logp, K + 1).values.numpy())
        assert determined.mean() > 0.9  # the comparison covers most slots
        assert np.array_equal(v_ids[determined], ref.ids.numpy()[determined])
        assert np.abs(v_lp - ref.logprobs.numpy()).max() < 1e-4
        assert np.abs(v_rest - ref.rest.numpy()).max() < 1e-3
        hf_nll = float(-logp.gather(-1, torch.from_numpy(row[1:, None])).mean())
        assert abs(v_nll - hf_nll) < 1e-5
    # the labeler's columns (float16 files) equal the HF backend's, to float16 rounding
    out, hf = engine(dict(batch)), hf_labeler(teacher)(dict(batch))
    assert (out["error"] == "").all()
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "teacher_nll"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    assert np.array_equal(out["input_ids"], hf["input_ids"])
    assert np.mean(out["topk_ids"] == hf["topk_ids"]) > 0.98
    for col in ("topk_logprobs", "rest_logprob"):
        assert np.allclose(out[col].astype(np.float32), hf[col].astype(np.float32), rtol=2 ** -10,
                           atol=1e-3), col
    assert np.abs(out["teacher_nll"] - hf["teacher_nll"]).max() < 1e-5


@pytest.mark.parametrize("mode", ["hard", "hard+soft"])
def test_greedy_hard_rows_equal_hf_token_for_token(teacher, engine, mode):
    eos = VOCAB - 1  # any id: these random blocks rarely generate it
    batch = blocks(seed=1)
    out = hard_labeler(engine, mode, eos)(dict(batch))
    hf = hf_labeler(teacher, mode, eos)(dict(batch))
    assert (out["error"] == "").all() and (hf["error"] == "").all()
    for col in ("input_ids", "loss_from", "length"):
        assert out[col].dtype == hf[col].dtype and np.array_equal(out[col], hf[col]), col
    assert np.abs(out["teacher_nll"] - hf["teacher_nll"]).max() < 1e-5
    if mode == "hard+soft":
        assert out["topk_ids"].shape == hf["topk_ids"].shape == (8, (BLOCK - 1) * K)
        assert np.mean(out["topk_ids"] == hf["topk_ids"]) > 0.98
        assert np.allclose(out["topk_logprobs"].astype(np.float32),
                           hf["topk_logprobs"].astype(np.float32), rtol=2 ** -10, atol=1e-3)
        assert np.allclose(out["rest_logprob"].astype(np.float32),
                           hf["rest_logprob"].astype(np.float32), rtol=2 ** -10, atol=1e-3)
    else:
        assert out["topk_ids"].shape == (8, 0)


def test_eos_stops_generation_and_is_recorded_as_hf_records_it(teacher, engine):
    batch = blocks(seed=2)
    free = hf_labeler(teacher, "hard", VOCAB - 1)(dict(batch))
    eos = int(free["input_ids"][0, 16 + 3])  # what block 0 generates 4th: now it is EOS
    out = hard_labeler(engine, "hard", eos)(dict(batch))
    hf = hf_labeler(teacher, "hard", eos)(dict(batch))
    assert out["length"][0] <= 16 + 4 and out["input_ids"][0, out["length"][0] - 1] == eos
    for row, length in zip(out["input_ids"], out["length"]):
        assert (row[length:] == PAD).all()
    for col in ("input_ids", "loss_from", "length"):
        assert np.array_equal(out[col], hf[col]), col


def test_sampled_hard_labels_are_reproducible_per_block_seed(engine):
    sample = {"sampling": "sample", "temperature": 1.0, "top_p": 0.95, "seed": 7}
    lab = hard_labeler(engine, "hard", VOCAB - 1, **sample)
    batch = blocks(seed=3)
    first = lab(dict(batch))
    again = lab({k: v[[5, 2, 0]] for k, v in batch.items()})  # other batch, other order
    assert np.array_equal(again["input_ids"], first["input_ids"][[5, 2, 0]])
    other = hard_labeler(engine, "hard", VOCAB - 1, **{**sample, "seed": 8})(dict(batch))
    assert not np.array_equal(other["input_ids"][:, 16:], first["input_ids"][:, 16:])


def test_empty_and_too_long_blocks_go_to_the_error_table(engine, tmp_path):
    import pyarrow.parquet as pq

    from distill.labels import write_error_table
    from distill.teachers.vllm import VLLMLabeler

    rows = np.empty(2, dtype=object)
    rows[:] = [np.zeros(0, np.int32), blocks(n=1, seed=4)["input_ids"][0]]
    out = engine({"block_id": np.array(["empty", "good"]), "input_ids": rows})
    # the labelable block is labeled, the empty one carries its reason
    assert out["error"][1] == "" and out["teacher_nll"][1] > 0
    assert out["error"][0].startswith("empty")
    # blocks of 65 tokens (a data.block_size beyond the teacher's 64 positions)
    longer = VLLMLabeler.from_engine(engine.llm, engine.params, K, VOCAB, max_model_len=engine.max_len,
                                     block_size=BLOCK + 1)
    long = longer({"block_id": np.array(["long"]), "input_ids": np.full((1, BLOCK + 1), 5, np.int32)})
    assert "65 tokens exceed its max_model_len of 64" in long["error"][0]
    errors = [{"block_id": b, "reason": r} for b, r in (("empty", out["error"][0]),
                                                        ("long", long["error"][0]))]
    write_error_table(errors, tmp_path / "errors.parquet")
    table = pq.read_table(tmp_path / "errors.parquet").to_pylist()
    assert [r["block_id"] for r in table] == ["empty", "long"]


def test_temperature_other_than_one_is_refused_naming_the_fix(teacher):
    from distill.teachers.vllm import VLLMLabeler

    with pytest.raises(ValueError, match="label.backend: hf"):
        VLLMLabeler(teacher, k=K, temperature=2.0, vocab_size=VOCAB)


def test_head_size_the_cpu_kernels_cannot_take_is_refused_before_any_work(tmp_path, monkeypatch):
    from distill.teachers.vllm import VLLMLabeler

    path = save_teacher(tmp_path / "heads8", heads=8)  # head size 128 / 8 = 16

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started for a teacher the CPU kernels cannot run")

    monkeypatch.setattr(vllm, "LLM", no_engine)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"head size 16 .*label\.backend: hf"):
        VLLMLabeler(path, k=K, temperature=1.0, vocab_size=VOCAB, dtype="float32")
    assert time.perf_counter() - start < 20
