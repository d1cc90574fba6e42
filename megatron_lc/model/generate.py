"""Autoregressive generation with a KV cache: one prefill, then one token per step."""
from __future__ import annotations

import torch

from .transformer import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits ``[B, V]`` -> next tokens ``[B]`` int64: argmax when temperature is 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class EosTracker:
    """Which of ``batch_size`` rows have produced an end-of-sequence token (``eos_token_id``: one id, a list, or
    None for none). ``step`` fills rows that finished earlier with their EOS, as transformers does; ``done`` says
    when every row has finished (never without EOS ids)."""

    def __init__(self, eos_token_id: int | list[int] | None, batch_size: int, device: torch.device | str):
        ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.ids = torch.tensor(ids, device=device, dtype=torch.long)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Next tokens ``[B]`` int64 -> the tokens to emit ``[B]`` (finished rows get the first EOS id)."""
        if self.ids.numel() == 0:
            return token
        token = torch.where(self.finished, self.ids[0], token)
        self.finished |= torch.isin(token, self.ids)
        return token

    @property
    def done(self) -> bool:
        """Every row has produced an EOS (one host sync)."""
        return self.ids.numel() > 0 and bool(self.finished.all())


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue prompts ``input_ids [B, S]`` (same length, no padding) by up to ``max_new_tokens``.

    Returns ``[B, S + T]`` int64 with T <= max_new_tokens: generation stops once every row has produced an EOS;
    rows that finished earlier are filled with their EOS token, as transformers does.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    b, s = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, b, s + max_new_tokens, dtype, input_ids.device)
    eos = EosTracker(eos_token_id, b, input_ids.device)
    out = [input_ids]
    logits = model(input_ids, logits_to_keep=1, cache=cache)[:, -1]  # prefill
    for _ in range(max_new_tokens):
        token = eos.step(sample_next(logits, temperature, top_p, generator))
        out.append(token.unsqueeze(1))
        if eos.done:
            break
        if len(out) - 1 < max_new_tokens:
            logits = model(token.unsqueeze(1), cache=cache)[:, -1]
    return torch.cat(out, dim=1)
