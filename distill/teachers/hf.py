"""Hugging Face teacher: batched teacher-forcing forward passes → top-k soft labels."""

from __future__ import annotations

import numpy as np
import torch

from distill.losses import topk_labels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFLabeler:
    """Callable class for Ray Data ``map_batches``: loads the teacher once per actor.

    Input batch: ``block_id`` [B], ``input_ids`` [B, T]. Output adds ``topk_ids`` and
    ``topk_logprobs`` [B, (T-1)·K], ``rest_logprob`` [B, T-1] and ``teacher_nll`` [B].
    """

    def __init__(self, model_dir: str, k: int, temperature: float, vocab_size: int,
                 dtype: str = "float32", use_gpu: bool = False, trust_remote_code: bool = False):
        from distill.models import load_causal_lm, pick_device

        torch.set_num_threads(1)  # one actor per CPU: Ray sizes the pool, not torch
        self.device = pick_device(use_gpu)
        self.model = load_causal_lm(model_dir, trust_remote_code, DTYPES[dtype]).to(self.device).eval()
        self.k, self.temperature, self.vocab = k, temperature, vocab_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64)).to(self.device)
        logits = self.model(input_ids=ids[:, :-1]).logits[..., : self.vocab].float()
        b, p, v = logits.shape
        flat = logits.reshape(b * p, v)
        lse = torch.logsumexp(flat, dim=-1)
        labels = topk_labels(flat, self.k, self.temperature, lse if self.temperature == 1.0 else None)
        # The teacher's loss on the real next token (τ = 1), for L_T without another pass.
        target_logit = flat.gather(-1, ids[:, 1:].reshape(-1, 1)).squeeze(-1)
        nll = (lse - target_logit).view(b, p).mean(-1)
        k = labels.ids.shape[-1]
        out = dict(batch)
        out.update(
            input_ids=np.stack(batch["input_ids"]).astype(np.int32),
            topk_ids=labels.ids.view(b, p * k).to(torch.int32).cpu().numpy(),
            topk_logprobs=labels.logprobs.view(b, p * k).to(torch.float16).cpu().numpy(),
            rest_logprob=labels.rest.view(b, p).to(torch.float16).cpu().numpy(),
            teacher_nll=nll.to(torch.float32).cpu().numpy(),
        )
        return out
