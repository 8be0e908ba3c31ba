"""
The decoding state of Show, Attend and Tell's LSTM decoder, as `generate()` carries it from step to step
(transformers keeps its own cache classes beside the models too, in `cache_utils.py`).

Saved with the model's code files: the model file imports it.
"""

from __future__ import annotations

import torch

try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:
    _ALL_CACHE_NAMES = ["past_key_values"]

# generate() passes the decoding state to `forward` and reads it back from the output under one name,
# which changed inside transformers 5.x ("past_key_values" up to 5.2x, then "cache"). A state returned
# under the other name would be silently dropped and decoding would restart from scratch every step.
CACHE_NAME: str = _ALL_CACHE_NAMES[0]


class ShowAttendTellCache:
    """
    Decoding state of the LSTM decoder, carried between `generate()` steps, and between `generate()` calls
    (pass the `cache` / `past_key_values` of one call's output to the next to continue its captions).

    An LSTM has no keys and values: it carries its state `(hidden, cell)`, one row per decoded sequence, plus
    the image features and their attention projection `W_e a`, computed once per image and shared by all
    of that image's rows. Beam search only reorders rows within an image, so `reorder_cache` touches the
    small per-row state and never the features.

    Args:
        features (`(images, num_pixels, encoder_dim)`), projected_features (`(images, num_pixels, attention_dim)`)
        hidden, cell (`(rows, decoder_dim)`)
        seq_length (`int`): how many tokens the state has consumed.
    """

    is_compileable = False  # read by generate() on CUDA; this state cannot be a static cache
    # A recurrent state, like the linear-attention (Mamba/SSM) layers of transformers' caches: generate()
    # hands a continued decoding the whole sequence and `prepare_inputs_for_generation` feeds the new tokens.
    is_linear = (True,)

    def __init__(
        self,
        features: torch.Tensor,
        projected_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        seq_length: int = 0,
    ) -> None:
        self.features = features
        self.projected_features = projected_features
        self.hidden = hidden
        self.cell = cell
        self.seq_length = seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> ShowAttendTellCache:
        """Selects the rows that survive a beam-search step, in place (generate ignores the return value)."""
        beam_idx = beam_idx.to(self.hidden.device)
        self.hidden = self.hidden.index_select(0, beam_idx)
        self.cell = self.cell.index_select(0, beam_idx)
        return self

    def repeat_rows(self, copies: int) -> None:
        """Gives every row `copies` consecutive copies, in place (a state continued with more beams)."""
        self.hidden = self.hidden.repeat_interleave(copies, dim=0)
        self.cell = self.cell.repeat_interleave(copies, dim=0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={self.features.shape[0]}, rows={self.hidden.shape[0]}, "
            f"seq_length={self.seq_length})"
        )
