"""What both teacher backends share (numpy only, no torch or vllm import): which blocks
can be labeled, per-block sampling seeds, and the top-k filler of positions without a loss."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from distill.io import sha256_bytes

# log(0) stand-in for the rest bucket of filler positions (the loss's own floor)
LOG_FLOOR = -100.0


def block_problem(row: np.ndarray, block_size: int, vocab_size: int, max_positions: int | None,
                  needed: int | None = None, limit_name: str = "max_position_embeddings") -> str:
    """Why one block cannot be labeled ('' when it can): empty, wrong length, a token outside
    the vocabulary, or longer than the teacher's positions (``needed``: tokens the teacher
    must see, the block's length by default)."""
    if row.size < 2:
        return f"empty: {row.size} token(s), nothing to label (needs ≥ 2)"
    if row.size != block_size:
        return f"length {row.size} differs from the block size {block_size}"
    bad = row[(row < 0) | (row >= vocab_size)]
    if bad.size:
        return f"token id {int(bad[0])} outside the vocabulary of {vocab_size}"
    needed = row.size if needed is None else needed
    if max_positions is not None and needed > max_positions:
        return (f"too long for the teacher: {needed} tokens exceed its "
                f"{limit_name} of {max_positions}")
    return ""


def generation_seed(seed: int, block_id: str) -> int:
    """Per-block sampling seed: a block's generation does not depend on its batch."""
    return int(sha256_bytes(f"{seed}:{block_id}".encode())[:8], 16)


def filler_topk(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k entries for positions without a loss: a valid (uniform) distribution, so the
    loss's arithmetic stays finite on rows it masks out."""
    ids = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    lps = np.full((n, k), -np.log(k), np.float32)
    return ids, lps, np.full(n, LOG_FLOOR, np.float32)


def empty_columns(b: int, t: int, k: int) -> dict[str, np.ndarray]:
    """A labeler's output columns for ``b`` rows of ``t`` tokens and ``k`` kept log-probs,
    zero-filled (rows that fail keep these and carry an ``error``)."""
    return {"input_ids": np.zeros((b, t), np.int32),
            "topk_ids": np.zeros((b, (t - 1) * k), np.int32),
            "topk_logprobs": np.zeros((b, (t - 1) * k), np.float16),
            "rest_logprob": np.zeros((b, (t - 1) if k else 0), np.float16),
            "teacher_nll": np.zeros(b, np.float32),
            "loss_from": np.zeros(b, np.int32), "length": np.full(b, t, np.int32)}


def label_labelable(batch: dict[str, np.ndarray], block_size: int | None, k: int,
                    problem: Callable[[np.ndarray, int], str],
                    label: Callable[[np.ndarray, list[str]], dict[str, np.ndarray]],
                    needs_block_id: bool = False) -> dict[str, np.ndarray]:
    """One labeler call, whatever the backend: rows that ``problem`` rejects keep zero-filled
    columns and carry their reason in ``error``; the rest go to ``label(ids [b, t] int64,
    block_ids)`` together. Returns the batch with the label columns and ``error`` added.

    ``block_id`` is optional for soft labels (rows are then named by position in messages);
    hard modes need it (``needs_block_id``): it seeds each block's sampling."""
    if needs_block_id and "block_id" not in batch:
        raise ValueError("hard-label modes need each row's block_id: it seeds the block's sampling")
    names = batch["block_id"] if "block_id" in batch else [f"row {i}" for i in range(len(batch["input_ids"]))]
    rows = [np.asarray(r).reshape(-1) for r in batch["input_ids"]]
    t = block_size or max(r.size for r in rows)
    errors = [problem(r, t) for r in rows]
    good = [i for i, e in enumerate(errors) if not e]
    out = empty_columns(len(rows), t, k)
    if good:
        part = label(np.stack([rows[i] for i in good]).astype(np.int64),
                     [str(names[i]) for i in good])
        for name, value in part.items():
            if len(good) == len(rows):  # the usual case: no copy into the zero-filled columns
                out[name] = np.asarray(value, out[name].dtype)
            else:
                out[name][good] = value
    result = dict(batch)
    result.update(out, error=np.array(errors, dtype=object))
    return result
