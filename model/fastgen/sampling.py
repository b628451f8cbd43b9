"""The logits processors and the sampler of the batched GPT-2 decoder, per row and on the device.

Each matches its Hugging Face counterpart (RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor,
then temperature → top-k → top-p) with per-row settings held in tensors, so rows with different settings
share one CUDA graph. Nothing here reads a tensor back to the host or copies from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows whose top_k is in 1..TOP_K_CAP share a cheap top-k path; top_k 0 (off) or larger needs a full sort.
TOP_K_CAP = 128


def apply_repetition_penalty(
    logits: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, penalty: torch.Tensor, window: int
) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor per row, in place: the logit of every token in
    tokens[b, :pos + 1] is multiplied by penalty[b] if negative, else divided by it."""
    ends = torch.arange(window, device=tokens.device)
    # Positions past a row's end repeat its current token, so no stale id is touched; a repeated id
    # gathers and writes back the same value, as in HF's gather → scatter over input_ids.
    seen = torch.where(ends <= pos[:, None], tokens[:, :window], tokens.gather(1, pos[:, None]))
    scores = logits.gather(1, seen)
    factor = penalty[:, None]
    return logits.scatter_(1, seen, torch.where(scores < 0, scores * factor, scores / factor))


def ban_repeated_ngrams(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    ngram: torch.Tensor,
    window: int,
    span: int,
) -> torch.Tensor:
    """HF's NoRepeatNGramLogitsProcessor per row, vectorised and in place: ban (-inf) every token that
    would complete an n-gram (n = ngram[b], 0 = off) already in tokens[b, :pos + 1].
    `span` >= every n; window > every pos.

    For each end position e, the n-1 tokens before e are compared with the row's last n-1 tokens; a
    full match bans tokens[e]. Right-aligning the comparisons lets one [B, W, span-1] test serve
    rows with different n."""
    lookback = span - 1
    history = tokens[:, :window]  # [B, W]
    idx = torch.arange(lookback, device=tokens.device)
    # before[b, e, k] = tokens[b, e - lookback + k]: the lookback tokens ending just before e
    before = F.pad(history, (lookback, 0), value=-1).unfold(1, lookback, 1)[:, :window]
    # suffix[b, k] = tokens[b, pos - lookback + 1 + k]: the row's last lookback tokens
    suffix = tokens.gather(1, (pos[:, None] - (lookback - 1) + idx).clamp(min=0))
    matters = idx >= (span - ngram)[:, None]  # only the last n-1 columns count for a row's n
    matched = ((before == suffix[:, None, :]) | ~matters[:, None, :]).all(-1)  # [B, W]
    ends = torch.arange(window, device=tokens.device)
    in_range = (ends >= (ngram - 1)[:, None]) & (ends <= pos[:, None]) & (ngram > 0)[:, None]
    # An id can be hit at one position and not at another: a min-reduction with +inf for misses makes
    # the outcome independent of write order.
    ban = torch.full(matched.shape, float("inf"), device=logits.device)  # created on the device: capturable
    ban.masked_fill_(matched & in_range, float("-inf"))
    return logits.scatter_reduce_(1, history, ban, reduce="amin")


def sample_top_k_top_p(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    cap: int,
) -> torch.Tensor:
    """Temperature → top-k → top-p (HF's order) per row, then inverse-CDF sampling with `uniform` [B].

    Only the best `cap` candidates are ranked (cap = V ranks all), so rows with different settings share
    one kernel sequence; top_k 0 or > cap means "no top-k limit" within the cap."""
    if cap >= logits.shape[-1]:
        values, ids = logits.sort(-1, descending=True)
    else:
        values, ids = logits.topk(cap, -1)  # sorted, largest first
    # Dividing by T > 0 keeps the order, so scaling the candidates equals HF's scaling of every logit.
    values = values / torch.where(temperature > 0, temperature, 1.0)[:, None]
    rank = torch.arange(values.shape[-1], device=logits.device)
    limit = torch.where((top_k > 0) & (top_k < cap), top_k, cap)
    probs = values.masked_fill(rank >= limit[:, None], float("-inf")).softmax(-1)
    # Top-p keeps a candidate while the mass ranked above it is below p (HF: drop where the ascending
    # cumulative mass <= 1 - p); the best candidate always stays.
    cumulative = probs.cumsum(-1)
    probs = probs.masked_fill(cumulative - probs >= top_p[:, None], 0.0)
    cumulative = probs.cumsum(-1)
    target = uniform[:, None] * cumulative[:, -1:]
    choice = (cumulative < target).sum(-1, keepdim=True).clamp_(max=values.shape[-1] - 1)
    return ids.gather(1, choice).squeeze(1)
