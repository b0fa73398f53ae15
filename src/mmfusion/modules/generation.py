"""Decoding token sequences from a :class:`~mmfusion.modules.decoder.TextDecoder`: greedy, beam search, sampling.

- Greedy takes the most likely token each step (deterministic).
- Beam search keeps the ``num_beams`` best partial captions by total log-probability; a finished beam carries on
  unchanged, and the winner is the best score divided by ``length ** length_penalty`` (above 0 favours longer
  captions, below 0 shorter ones). One beam is greedy decoding exactly.
- Sampling draws from the softmax at ``temperature``, restricted to the smallest set of tokens whose probability
  reaches ``top_p`` (nucleus sampling, Holtzman et al., 2020); a ``seed`` makes it repeatable without touching
  the global random state.
- ``repetition_penalty`` (as in CTRL, Keskar et al., 2019) divides the positive logits of tokens already
  generated (and multiplies the negative ones) by the penalty.

Every mode runs with the key-value cache by default; ``use_cache=False`` re-runs the whole prefix each step and
gives the same tokens (the test and the benchmark of the cache).
"""

from __future__ import annotations

import torch

from .decoder import TextDecoder


@torch.no_grad()
def generate(
    decoder: TextDecoder,
    memory: torch.Tensor,
    *,
    sot_id: int,
    eot_id: int,
    pad_id: int,
    max_new_tokens: int = 30,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    prompt: torch.Tensor | None = None,
) -> list[list[int]]:
    """Generated token ids per image (without ``<sot>`` or the prompt, cut before ``<eot>``).

    Args:
        decoder: the text decoder.
        memory: image tokens (B, M, memory_width).
        max_new_tokens: the most tokens generated (also bounded by the decoder's context length).
        num_beams: 1 for greedy or sampling; more for beam search (sampling then is not allowed).
        prompt: (B, P) token ids the generation continues, ``<sot>`` first, no padding (rows of one length;
            callers group prompts by length). A question, for a decoder trained on questions and answers.
    """
    if num_beams > 1 and do_sample:
        raise ValueError("beam search and sampling do not mix: use num_beams=1 to sample")
    if prompt is None:
        prompt = torch.full((memory.shape[0], 1), sot_id, dtype=torch.long, device=memory.device)
    if prompt.shape[0] != memory.shape[0] or prompt.shape[1] < 1 or bool((prompt[:, 0] != sot_id).any()):
        raise ValueError(f"prompt must be (B={memory.shape[0]}, P) token ids starting with <sot>, "
                         f"got {tuple(prompt.shape)}")  # fmt: skip
    given = prompt.shape[1]
    if given >= decoder.cfg.context_length:
        raise ValueError(f"a prompt of {given} tokens leaves no room in the decoder's {decoder.cfg.context_length}")
    steps = min(max_new_tokens, decoder.cfg.context_length - given)
    if num_beams > 1:
        seqs = _beam_search(decoder, memory, prompt, eot_id, pad_id, steps, num_beams, length_penalty,
                            repetition_penalty, use_cache)  # fmt: skip
    else:
        sample = do_sample and temperature > 0
        gen = None
        if sample and seed is not None:
            gen = torch.Generator(device=memory.device).manual_seed(seed)
        seqs = _greedy_or_sample(decoder, memory, prompt, eot_id, pad_id, steps, sample, temperature, top_p,
                                 repetition_penalty, gen, use_cache)  # fmt: skip
    out = []
    for row in seqs[:, given:].tolist():
        out.append(row[: row.index(eot_id)] if eot_id in row else row)
    return out


def _next_logits(decoder, seqs, memory, cache, new) -> torch.Tensor:
    if cache is not None:
        return decoder(new, cache=cache)[:, -1].float()
    return decoder(seqs, memory=memory)[:, -1].float()


def _penalise(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or seqs.shape[1] < 2:
        return logits
    seen = seqs[:, 1:]
    picked = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def _greedy_or_sample(decoder, memory, prompt, eot_id, pad_id, steps, sample, temperature, top_p, penalty, gen,
                      use_cache) -> torch.Tensor:  # fmt: skip
    B = memory.shape[0]
    seqs = prompt
    cache = decoder.start(memory) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=memory.device)
    new = seqs
    for _ in range(steps):
        logits = _penalise(_next_logits(decoder, seqs, memory, cache, new), seqs, penalty)
        if sample:
            nxt = _sample(logits / temperature, top_p, gen)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eot_id
        if bool(done.all()):
            break
        new = nxt[:, None]
    return seqs


def _sample(logits: torch.Tensor, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # tokens after the nucleus is full
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=gen)
        return order.gather(1, choice).squeeze(1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _beam_search(decoder, memory, prompt, eot_id, pad_id, steps, K, length_penalty, penalty,
                 use_cache) -> torch.Tensor:  # fmt: skip
    B, dev = memory.shape[0], memory.device
    memory = memory.repeat_interleave(K, dim=0)  # (B*K, M, W), beams of an image side by side
    cache = decoder.start(memory) if use_cache else None
    seqs = prompt.repeat_interleave(K, dim=0)
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = float("-inf")  # the first step expands one beam, not K copies of it
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B * K, device=dev)
    new = seqs
    for _ in range(steps):
        logp = _penalise(_next_logits(decoder, seqs, memory, cache, new), seqs, penalty).log_softmax(dim=-1)
        V = logp.shape[-1]
        logp[finished] = float("-inf")  # a finished beam continues only with padding, at no cost
        logp[finished, pad_id] = 0.0
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        scores, index = cand.topk(K, dim=-1)  # (B, K)
        rows = (torch.arange(B, device=dev)[:, None] * K + index // V).flatten()
        tokens = (index % V).flatten()
        was_finished = finished[rows]
        seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
        lengths = lengths[rows] + (~was_finished).float()
        finished = was_finished | (tokens == eot_id)
        if cache is not None:
            cache.reorder(rows)
        if bool(finished.all()):
            break
        new = tokens[:, None]
    normalised = scores / lengths.clamp_min(1).view(B, K) ** length_penalty
    best = normalised.argmax(dim=-1)
    return seqs.view(B, K, -1)[torch.arange(B, device=dev), best]
