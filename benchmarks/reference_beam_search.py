"""
The reference of `bench_generate.py`: beam search written the classic way, one image at a time.

This is how the original implementation (a-PyTorch-Tutorial-to-Image-Captioning, `caption.py`) decodes,
and what `generate()` is measured against:

- one image at a time, in float32;
- the image features copied once per beam, and copied again when beams are reordered;
- the attention projection of the features `W_f f` recomputed at every step, for every beam;
- the attention-weighted average as an element-wise product and a sum over the grid.

It runs the model's own modules (embedding, attention layers, gate, LSTM cell, output layer), so its
captions can be compared with `generate()`'s id for id.

Two search rules are available:

- `"fixed"` (the default): the beam keeps `num_beams` live hypotheses; at each step the `2 * num_beams`
  best continuations are scored, those among the best `num_beams` that end with `<end>` join the
  finished hypotheses (the best `num_beams` are kept), and the best `num_beams` others continue. The
  search stops when `num_beams` hypotheses are finished and no live one scores higher than the worst of
  them (scores only decrease, so none could), or at `max_new_tokens`. With `length_penalty=0` this is
  what transformers' `generate(num_beams=...)` does, so the two return the same captions.
- `"shrinking"`: the tutorial's own rule: the beam shrinks by one each time a hypothesis ends, and the
  search stops when all `num_beams` have ended (hypotheses still open at `max_new_tokens` count as
  ended). It explores less than `generate()` after the first `<end>`, so it can return another caption.

Both score a caption by the sum of its words' log-probabilities (no length normalisation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Caption(NamedTuple):
    tokens: list[int]
    score: float
    steps: int


class _ClassicDecoder:
    """One decoding step of the model's decoder, computed the classic way (see the module docstring)."""

    def __init__(self, model) -> None:
        self.decoder = model.decoder
        self.attention = model.decoder.attention

    def initial_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean_features = features.mean(dim=1)
        return self.decoder.init_hidden(mean_features), self.decoder.init_cell(mean_features)

    def step(
        self, words: torch.Tensor, features: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """words (k,), features (k, num_pixels, encoder_dim) -> log-probs (k, vocab), hidden, cell."""
        attention = self.attention
        projected = attention.encoder_projection(features)  # recomputed at every step, for every beam
        query = attention.decoder_projection(hidden)
        scores = attention.score(F.relu(projected + query.unsqueeze(1))).squeeze(2)
        alpha = F.softmax(scores, dim=1)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)
        context = torch.sigmoid(self.decoder.gate(hidden)) * context
        embedded = self.decoder.embedding(words)
        hidden, cell = self.decoder.lstm(torch.cat([embedded, context], dim=1), (hidden, cell))
        logits = self.decoder.output_layer(hidden)
        return F.log_softmax(logits, dim=1), hidden, cell


@torch.inference_mode()
def classic_beam_search(
    model,
    features: torch.Tensor,
    num_beams: int = 5,
    max_new_tokens: int = 20,
    search: str = "fixed",
) -> Caption:
    """
    Captions one image.

    Args:
        model: a `ShowAttendTellForConditionalGeneration` (float32, eval mode).
        features (`(num_pixels, encoder_dim)` or `(1, num_pixels, encoder_dim)`): the image's encoder output.
        search: `"fixed"` (generate()'s rule) or `"shrinking"` (the tutorial's), see the module docstring.

    Returns:
        `Caption(tokens, score, steps)`: the generated tokens (without `<start>`, with `<end>` when the
        caption ended), their score, and how many decoding steps the search ran.
    """
    if search not in ("fixed", "shrinking"):
        raise ValueError(f"unknown search rule {search!r}")
    config = model.config
    start, end = config.decoder_start_token_id, config.eos_token_id
    step_fn = _ClassicDecoder(model)
    features = features.reshape(1, *features.shape[-2:]).float()
    device = features.device
    num_pixels, encoder_dim = features.shape[1:]
    hidden, cell = step_fn.initial_state(features)
    words = torch.tensor([start], device=device)
    sequences = [[]]
    live_scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []
    k = num_beams  # the tutorial's shrinking beam width
    with torch.autocast(features.device.type, enabled=False):
        for step in range(max_new_tokens):
            beam_features = features.expand(len(sequences), num_pixels, encoder_dim).contiguous()
            log_probs, hidden, cell = step_fn.step(words, beam_features, hidden, cell)
            vocab_size = log_probs.shape[1]
            candidates = (live_scores.unsqueeze(1) + log_probs).view(-1)
            last_step = step == max_new_tokens - 1
            if search == "fixed":
                top_scores, top_indices = candidates.topk(min(2 * num_beams, candidates.numel()))
                sources, tokens = top_indices // vocab_size, top_indices % vocab_size
                keep = []
                for rank, (score, source, token) in enumerate(
                    zip(top_scores.tolist(), sources.tolist(), tokens.tolist(), strict=True)
                ):
                    if token == end or last_step:
                        if rank < num_beams:
                            finished.append((score, [*sequences[source], token]))
                    elif len(keep) < num_beams:
                        keep.append(rank)
                finished = sorted(finished, key=lambda item: item[0], reverse=True)[:num_beams]
                if last_step:
                    break
                keep = torch.tensor(keep, device=device)
                live_scores = top_scores[keep]
                # done when the beam is full of finished captions and no live one can beat them
                if len(finished) == num_beams and live_scores.max().item() <= finished[-1][0]:
                    break
            else:
                top_scores, top_indices = candidates.topk(k)
                sources, tokens = top_indices // vocab_size, top_indices % vocab_size
                keep = []
                for rank, (score, source, token) in enumerate(
                    zip(top_scores.tolist(), sources.tolist(), tokens.tolist(), strict=True)
                ):
                    if token == end or last_step:
                        finished.append((score, [*sequences[source], token]))
                    else:
                        keep.append(rank)
                k -= len(top_scores) - len(keep)
                if k == 0 or last_step:
                    break
                keep = torch.tensor(keep, device=device)
                live_scores = top_scores[keep]
            chosen_sources, words = sources[keep], tokens[keep]
            sequences = [
                [*sequences[s], w] for s, w in zip(chosen_sources.tolist(), words.tolist(), strict=True)
            ]
            # the state and (in the classic code) the copied features follow the surviving beams
            hidden, cell = hidden[chosen_sources], cell[chosen_sources]
    best_score, best_tokens = max(finished, key=lambda item: item[0])
    return Caption(best_tokens, best_score, step + 1)
