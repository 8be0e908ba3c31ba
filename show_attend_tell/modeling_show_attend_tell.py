"""Show, Attend and Tell (Xu et al., 2015) with soft attention, as a transformers model.

An image travels through this file top to bottom:

1. `ShowAttendTellEncoder`: a ResNet without its classification head turns `pixel_values`
   (images, 3, 256, 256) into a feature map, adaptively average-pooled to a square grid and flattened to
   the annotation vectors `a` (images, num_pixels, encoder_dim), e.g. (images, 196, 2048) for ResNet-101.
2. `ShowAttendTellAttention`: at every word, the soft attention of section 4.2 scores each grid position
   against the LSTM state, `alpha = softmax(w^T relu(W_e a + W_h h))`, and averages the features by it.
3. `ShowAttendTellDecoder`: an LSTM cell fed with the previous word and the gated context
   `sigmoid(f_beta(h)) * sum_i alpha_i a_i` predicts the next word (section 3.1.2).
4. `ShowAttendTellForConditionalGeneration`: encoder -> decoder -> loss (cross-entropy plus the doubly
   stochastic penalty of eq. 14), and the hooks through which `generate()` decodes greedily, by sampling
   or by beam search, carrying the LSTM state between steps in a `ShowAttendTellCache`
   (`cache_show_attend_tell.py`).

Several decoder rows may share one image: the captions of one image during training, or the beams of one
image during `generate()`. Rows are grouped by image in `repeat_interleave` order (rows `i * k ... i * k +
k - 1` belong to image `i`), so an image's features and their projection `W_e a` are stored once.

Inference without gradients takes a faster route through the same function, kept in
`fast_decoding_show_attend_tell.py` and entered from one place, `ShowAttendTellDecoder.forward`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, ResNetModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .cache_show_attend_tell import CACHE_NAME, ShowAttendTellCache
from .configuration_show_attend_tell import ShowAttendTellConfig
from .imagenet_weights_show_attend_tell import convert_torchvision_resnet_state_dict, load_torchvision_resnet
from .saving_show_attend_tell import copy_files, declare_folder_pipeline

try:  # transformers 5.x: initialisers that leave weights loaded from a checkpoint untouched
    from transformers import initialization as init
except ImportError:  # transformers 4.x skips loaded modules itself
    from torch.nn import init

# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class ShowAttendTellPreTrainedModel(PreTrainedModel):
    config_class = ShowAttendTellConfig
    config: ShowAttendTellConfig
    # The encoder is the base model: a head's checkpoint loads into `ShowAttendTellEncoder` (its "encoder."
    # keys) and an encoder's checkpoint into the head, with the library's own prefix handling.
    base_model_prefix = "encoder"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ShowAttendTellDecoder"]

    def _init_weights(self, module: nn.Module) -> None:
        """Initialises every parameter, so a model loaded with missing weights is fully defined."""
        std = self.config.init_std
        if isinstance(module, nn.Embedding):
            # As in the reference implementation: small uniform embedding and output layer, zero bias.
            init.uniform_(module.weight, -std, std)
        elif isinstance(module, nn.Linear) and module is getattr(
            getattr(self, "decoder", None), "output_layer", None
        ):
            init.uniform_(module.weight, -std, std)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features**0.5
            init.uniform_(module.weight, -bound, bound)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LSTMCell):
            bound = 1.0 / module.hidden_size**0.5
            for parameter in (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh):
                init.uniform_(parameter, -bound, bound)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)


class ShowAttendTellEncoder(ShowAttendTellPreTrainedModel):
    """
    ResNet feature extractor: `pixel_values` (images, 3, H, W) -> features (images, num_pixels, encoder_dim).

    The ResNet's own grid is H / 32 on a side (8 x 8 at 256 px); it is adaptively average-pooled to
    `encoded_image_size` (14 x 14 by default, as in the paper's implementation).
    """

    def __init__(self, config: ShowAttendTellConfig) -> None:
        super().__init__(config)
        self.resnet = ResNetModel(config.encoder_config)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((config.encoded_image_size, config.encoded_image_size))
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values (`(images, 3, height, width)`): normalised images.
            output_attentions: accepted for the generate() interface; a ResNet has no attention.
            output_hidden_states: also return the stem and stage outputs of the ResNet.

        Returns:
            `BaseModelOutput` with `last_hidden_state` of shape `(images, num_pixels, encoder_dim)`.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        grid, hidden_states = self.encode_grid(pixel_values, output_hidden_states=output_hidden_states)
        features = self.pool_grid(grid)
        if return_dict is False:
            return (features, hidden_states) if output_hidden_states else (features,)
        return BaseModelOutput(last_hidden_state=features, hidden_states=hidden_states)

    def encode_grid(
        self, pixel_values: torch.FloatTensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The ResNet's last feature map at its native resolution, (images, encoder_dim, H/32, W/32)."""
        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        return outputs.last_hidden_state, outputs.hidden_states

    def pool_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(images, encoder_dim, h, w) -> (images, encoded_image_size ** 2, encoder_dim)."""
        return self.adaptive_pool(grid).flatten(2).transpose(1, 2)

    def set_trainable_stages(self, num_stages: int) -> None:
        """
        Freezes the ResNet except its last `num_stages` stages (0 freezes all of it, the default of
        training; the paper's implementation fine-tunes the last three when asked to).
        """
        self.resnet.requires_grad_(False)
        stages = self.resnet.encoder.stages
        for stage in list(stages)[len(stages) - num_stages :] if num_stages > 0 else []:
            stage.requires_grad_(True)

    def load_imagenet_weights(self, progress: bool = True) -> None:
        """Loads torchvision's ImageNet weights of ResNet-101 into this ResNet (see `load_torchvision_resnet`)."""
        load_torchvision_resnet(self.resnet, self.config, progress)


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


class ShowAttendTellAttention(GradientCheckpointingLayer):
    """
    Soft (deterministic) attention of section 4.2: `alpha = softmax(w^T relu(W_e a + W_h h))` over the grid.

    The image side `W_e a` does not change while a caption is decoded: `project_features` computes it once
    per image. The `(rows, num_pixels, attention_dim)` activation is most of a training step's memory: with
    `activation_checkpointing_enable()` (`gradient_checkpointing_enable()` before transformers 5) it is
    recomputed in the backward pass instead of kept.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_projection = nn.Linear(encoder_dim, attention_dim)  # W_e
        self.decoder_projection = nn.Linear(decoder_dim, attention_dim)  # W_h
        self.score = nn.Linear(attention_dim, 1)  # w

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """`W_e a`: (images, num_pixels, encoder_dim) -> (images, num_pixels, attention_dim)."""
        return self.encoder_projection(features)

    def forward(
        self,
        features: torch.Tensor,
        projected_features: torch.Tensor,
        hidden: torch.Tensor,
        rows_per_image: int | None = None,
        row_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            features `a` (`(images, num_pixels, encoder_dim)`), projected_features `W_e a` (`(images,
                num_pixels, attention_dim)`)
            hidden `h` (`(rows, decoder_dim)`): the LSTM state of every row (rows = images x rows_per_image,
                grouped by image), or of the rows `row_ids` only (a subset of those, in any order; then
                `rows_per_image` is needed).

        Returns:
            context (`(rows, encoder_dim)`): `sum_i alpha_i a_i`, and alpha (`(rows, num_pixels)`).
        """
        images, num_pixels, _ = features.shape
        query = self.decoder_projection(hidden)  # W_h h: (rows, attention_dim)
        if row_ids is None:  # (images, 1, num_pixels, A) + (images, rows_per_image, 1, A): no copy per row
            rows_per_image = hidden.shape[0] // images
            pre_activation = projected_features.unsqueeze(1) + query.view(images, rows_per_image, 1, -1)
            pre_activation = pre_activation.flatten(0, 1)
        else:
            pre_activation = projected_features[row_ids // rows_per_image] + query.unsqueeze(1)
        scores = self.score(torch.relu(pre_activation)).squeeze(-1)  # (rows, num_pixels)
        alpha = scores.softmax(dim=-1)
        # One batched product per image serves all of its rows (the features are not copied per row); a
        # subset of rows is placed in that layout first, the other rows attending to nothing.
        grouped = alpha
        if row_ids is not None:
            grouped = alpha.new_zeros(images * rows_per_image, num_pixels).index_copy(0, row_ids, alpha)
        context = torch.bmm(grouped.view(images, rows_per_image, num_pixels), features).flatten(0, 1)
        if row_ids is not None:
            context = context.index_select(0, row_ids)
        return context, alpha


# Decoding each caption only up to its end gathers the rows still running at every step, which costs more
# than the padding it skips until about a quarter of the padded batch is padding (benchmarks/README.md,
# bench_train: 0.78x to 0.87x at 12% padding, 1.16x to 1.31x at 39%). Flickr30K's captions, 12.3 words on
# average with a long tail, usually pad a batch far more than that.
PADDING_SHARE_WORTH_SKIPPING = 0.25


class DecoderOutput(NamedTuple):
    """What `ShowAttendTellDecoder.forward` returns (see there for the shapes)."""

    logits: torch.Tensor
    alphas: torch.Tensor
    lstm_outputs: torch.Tensor
    cache: ShowAttendTellCache | None
    # When the padding was skipped: the logits of the computed positions (positions, vocab_size) and those
    # positions as (row index, step index); the loss needs no others.
    decoded_logits: torch.Tensor | None = None
    decoded_positions: tuple[torch.Tensor, torch.Tensor] | None = None


class ShowAttendTellDecoder(nn.Module):
    """
    The LSTM that writes the caption. At step t, with state (h, c) from step t-1 and word w_{t-1}:

        context, alpha_t = attention(a, h)                  # sum_i alpha_ti a_i
        context = sigmoid(f_beta(h)) * context              # the gate of section 4.2.1
        h, c = LSTMCell([E w_{t-1}; context], (h, c))
        logits_t = output_layer(dropout(h))

    The initial state is a linear function of the mean feature vector (section 3.1.2).

    Inference (eval mode without gradients: `generate()`, evaluation) computes the same function through
    `fast_decoding_show_attend_tell.inference_forward` while `fast_inference` is True (the default); its
    options `fuse_attention_scores` (the attention scores compiled with `torch.compile`) and `capture_steps`
    (every step after the first compiled with `torch.compile(mode="reduce-overhead")`: CUDA graphs recorded
    and replayed by torch on a GPU) are off by default and described there.
    """

    def __init__(self, config: ShowAttendTellConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)  # E
        self.attention = ShowAttendTellAttention(config.encoder_dim, config.decoder_dim, config.attention_dim)
        self.init_hidden = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.init_cell = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.gate = nn.Linear(config.decoder_dim, config.encoder_dim)  # f_beta
        self.lstm = nn.LSTMCell(config.embed_dim + config.encoder_dim, config.decoder_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_layer = nn.Linear(config.decoder_dim, config.vocab_size)
        self.fast_inference = True
        self.fuse_attention_scores = False
        self.capture_steps = False
        self.inference_memo = None  # the fast path's prepared weights and compiled step; copies drop it

    def __getstate__(self) -> dict:
        # the memo is rebuilt on demand, and may hold what cannot be copied (oneDNN-packed weights, a compiled
        # function)
        return {**super().__getstate__(), "inference_memo": None}

    def initial_state(self, features: torch.Tensor, rows_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, num_pixels, encoder_dim) -> hidden, cell of shape (images * rows_per_image, decoder_dim)."""
        mean_features = features.mean(dim=1)
        hidden = self.init_hidden(mean_features).repeat_interleave(rows_per_image, dim=0)
        cell = self.init_cell(mean_features).repeat_interleave(rows_per_image, dim=0)
        return hidden, cell

    def step(
        self,
        embedded: torch.Tensor,
        features: torch.Tensor,
        projected_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        rows_per_image: int | None = None,
        row_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        One word for every row: embedded previous words (rows, embed_dim) -> alpha (rows, num_pixels), hidden,
        cell. The rows are all of them, grouped by image, or the rows `row_ids` (see the attention). The output
        layer is not applied here: `forward` applies it once to every step's LSTM output.
        """
        context, alpha = self.attention(features, projected_features, hidden, rows_per_image, row_ids)
        context = torch.sigmoid(self.gate(hidden)) * context
        lstm_input = torch.cat([embedded, context.to(embedded.dtype)], dim=-1)
        hidden, cell = self.lstm(lstm_input, (hidden, cell))
        return alpha, hidden, cell

    def forward(
        self,
        input_ids: torch.LongTensor,
        features: torch.Tensor,
        cache: ShowAttendTellCache | None = None,
        lengths: torch.LongTensor | None = None,
    ) -> DecoderOutput:
        """
        Teacher-forced decoding of `input_ids` (rows, steps) over `features` (images, num_pixels, encoder_dim),
        continuing from `cache` when given.

        `lengths` (rows,), optional: how many steps of each row are needed (a caption's words and `<end>`; the
        rest is padding). The logits, attention and LSTM outputs past a row's length are then zeros; when at
        least `PADDING_SHARE_WORTH_SKIPPING` of the steps are padding, those steps are not computed at all
        (as the reference implementation's decode lengths do).

        Returns a `DecoderOutput`: logits (rows, steps, vocab_size), alphas (rows, steps, num_pixels), LSTM
        outputs (rows, steps, decoder_dim), the state after the last step, and, when the padding was skipped,
        the logits of the computed positions only.
        """
        rows, steps = input_ids.shape
        if cache is None and rows % features.shape[0]:
            raise ValueError(
                f"{rows} token rows cannot be grouped evenly over {features.shape[0]} images: rows must be "
                "images x rows_per_image, grouped by image"
            )
        if self.fast_inference and not self.training and not torch.is_grad_enabled():
            from .fast_decoding_show_attend_tell import inference_forward  # the one entry to the fast path

            return inference_forward(self, input_ids, features, cache)
        if cache is None:
            hidden, cell = self.initial_state(features, rows // features.shape[0])
            cache = ShowAttendTellCache(features, self.attention.project_features(features), hidden, cell)
        # The embedding and the output layer do not depend on the recurrence: one product each for all the
        # steps rather than one small product per step.
        embedded = self.embedding(input_ids)
        if (
            lengths is not None
            and cache.seq_length == 0
            and int(lengths.max()) > 0
            and float(lengths.sum()) <= (1.0 - PADDING_SHARE_WORTH_SKIPPING) * rows * steps
        ):
            return self._forward_by_length(embedded, cache, lengths)
        hidden, cell = cache.hidden, cache.cell
        all_alphas, all_hidden = [], []
        for t in range(steps):
            alpha, hidden, cell = self.step(
                embedded[:, t], cache.features, cache.projected_features, hidden, cell
            )
            all_alphas.append(alpha)
            all_hidden.append(hidden)
        lstm_outputs, alphas = torch.stack(all_hidden, dim=1), torch.stack(all_alphas, dim=1)
        logits = self.output_layer(self.dropout(lstm_outputs))
        if lengths is not None:  # zeros past each row's end, as when the padding is skipped
            padding = (torch.arange(steps, device=lengths.device) >= lengths.unsqueeze(1)).unsqueeze(-1)
            logits, alphas, lstm_outputs = (x.masked_fill(padding, 0) for x in (logits, alphas, lstm_outputs))
        new_cache = ShowAttendTellCache(
            cache.features, cache.projected_features, hidden, cell, cache.seq_length + steps
        )
        return DecoderOutput(logits, alphas, lstm_outputs, new_cache)

    def _forward_by_length(
        self, embedded: torch.Tensor, cache: ShowAttendTellCache, lengths: torch.LongTensor
    ) -> DecoderOutput:
        """
        `forward` for rows of different lengths: the rows are sorted longest first, so that the rows still
        running at step t are the first `running[t]` ones, and each step computes only those.
        """
        rows, steps, _ = embedded.shape
        features, keys = cache.features, cache.projected_features
        rows_per_image = rows // features.shape[0]
        order = lengths.argsort(descending=True, stable=True)
        running = (lengths.unsqueeze(1) > torch.arange(steps, device=lengths.device)).sum(0).tolist()
        embedded = embedded.index_select(0, order)
        hidden, cell = cache.hidden.index_select(0, order), cache.cell.index_select(0, order)
        all_alphas, all_hidden, row_index, step_index = [], [], [], []
        for t, count in enumerate(running):
            if count == 0:
                break
            row_ids = order[:count]
            alpha, hidden, cell = self.step(
                embedded[:count, t], features, keys, hidden[:count], cell[:count], rows_per_image, row_ids
            )
            all_alphas.append(alpha)
            all_hidden.append(hidden)
            row_index.append(row_ids)
            step_index.append(torch.full_like(row_ids, t))
        positions = (torch.cat(row_index), torch.cat(step_index))
        lstm_outputs = torch.cat(all_hidden)
        decoded_logits = self.output_layer(self.dropout(lstm_outputs))

        def padded(values: torch.Tensor) -> torch.Tensor:  # (positions, ...) -> (rows, steps, ...)
            return values.new_zeros(rows, steps, *values.shape[1:]).index_put(positions, values)

        # The final state of rows that ended early is gone: the returned cache cannot be continued.
        return DecoderOutput(
            padded(decoded_logits),
            padded(torch.cat(all_alphas)),
            padded(lstm_outputs),
            None,
            decoded_logits,
            positions,
        )


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """Decoder inputs from targets: `<start>` then the targets without the last one; -100 becomes `<pad>`."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_token_id)


# The private methods of transformers' GenerationMixin overridden here, where no public mechanism exists, with
# why (tested on transformers 4.57 and 5.24; tests/test_transformers_conventions.py fails with a clear message
# when a release renames or removes one, which would bypass the override silently).
OVERRIDDEN_PRIVATE_METHODS = {
    "_expand_inputs_for_generation": "keeps one copy of each image's features for all of its beams, and "
    "repeats the rows of a cache being continued with more beams",
    "_supports_default_dynamic_cache": "an LSTM state is not keys and values: generate() must not build a "
    "DynamicCache",
}

DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_NEW_TOKENS = 51  # 50 words and <end>


@dataclass
class _ShowAttendTellOutputFields(ModelOutput):
    """
    Output of [`ShowAttendTellForConditionalGeneration.forward`].

    Args:
        loss (`()`, returned with `labels`): cross-entropy over the non-padding targets plus `alpha_c` times
            the doubly-stochastic penalty.
        logits (`(rows, steps, vocab_size)`): scores of the next word at every step.
        decoder_hidden_states (`tuple` of one `(rows, steps, decoder_dim)`, *optional*): the LSTM outputs.
        decoder_attentions: always `None` (the decoder does not attend over its own words).
        cross_attentions (`tuple` of one `(rows, steps, num_pixels)`, *optional*): the attention over the
            image grid at every step, one tensor per decoder layer (one layer), as for every transformers
            encoder-decoder; each row sums to one.
        attention_maps (`(rows, steps, num_pixels)`, *optional*): the same tensor, for convenience.
        encoder_last_hidden_state (`(images, num_pixels, encoder_dim)`): the features attended over.
        encoder_hidden_states (`tuple`, *optional*): the ResNet's stem and stage outputs.
        cache / past_key_values (`ShowAttendTellCache`, *optional*): the decoding state after the last step,
            under the name the installed transformers reads.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_maps: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None


# The state field carries the name the installed generate() reads (see CACHE_NAME); declaring the other
# name too would make transformers 5.2x warn on every forward.
if CACHE_NAME == "cache":

    @dataclass
    class ShowAttendTellOutput(_ShowAttendTellOutputFields):
        __doc__ = _ShowAttendTellOutputFields.__doc__
        cache: ShowAttendTellCache | None = None

else:

    @dataclass
    class ShowAttendTellOutput(_ShowAttendTellOutputFields):
        __doc__ = _ShowAttendTellOutputFields.__doc__
        past_key_values: ShowAttendTellCache | None = None


class ShowAttendTellForConditionalGeneration(ShowAttendTellPreTrainedModel, GenerationMixin):
    """
    Show, Attend and Tell: ResNet encoder + soft-attention LSTM decoder.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("path/to/model", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("path/to/model", trust_remote_code=True)
    >>> inputs = processor(images=image, return_tensors="pt")
    >>> ids = model.generate(**inputs, num_beams=5, max_new_tokens=30)
    >>> processor.batch_decode(ids, skip_special_tokens=True)
    ```
    """

    def __init__(self, config: ShowAttendTellConfig) -> None:
        super().__init__(config)
        self.encoder = ShowAttendTellEncoder(config)
        self.decoder = ShowAttendTellDecoder(config)
        self.post_init()
        if self.generation_config is not None:
            # Captioning defaults (the paper's implementation decodes with a beam of 3, captions of up to 50
            # words); generation_config.json overrides them when a saved model is loaded.
            self.generation_config.num_beams = DEFAULT_NUM_BEAMS
            self.generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS

    def get_encoder(self, modality: str | None = None) -> ShowAttendTellEncoder:
        return self.encoder

    def get_decoder(self) -> ShowAttendTellDecoder:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.decoder.output_layer = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # see OVERRIDDEN_PRIVATE_METHODS
        return False

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> Any:
        """
        `PreTrainedModel.save_pretrained`. When the code files are saved with the weights (the classes are
        registered for the auto classes, as importing `show_attend_tell` does), the folder also loads with the
        image-to-text auto class and serves its own image-to-text pipeline (`declare_folder_pipeline`).
        """
        pipeline_files = declare_folder_pipeline(self) if self._auto_class is not None else []
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            copy_files(pipeline_files, save_directory)
        return result

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple[torch.Tensor, ...] | None = None,
        past_key_values: ShowAttendTellCache | None = None,
        cache: ShowAttendTellCache | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> ShowAttendTellOutput | tuple:
        r"""
        Args:
            pixel_values (`(images, 3, height, width)`): normalised images. Not needed with `encoder_outputs`
                or a cache.
            input_ids / decoder_input_ids (`(rows, steps)`): caption tokens fed to the decoder, starting with
                `<start>`; `rows` is a multiple of `images`, grouped by image. The model has no text encoder,
                so both names mean the decoder's input. Made from `labels` when not given.
            attention_mask / decoder_attention_mask: accepted for API compatibility; padding is handled
                through `labels` (-100 or `<pad>`).
            labels (`(rows, steps)`): next-word targets aligned with the decoder inputs.
            encoder_outputs: precomputed `last_hidden_state` of shape `(images, num_pixels, encoder_dim)`.
            past_key_values / cache (`ShowAttendTellCache`): decoding state of the previous steps.
            use_cache: return the decoding state (defaults to `config.use_cache` without labels).
            output_attentions, output_hidden_states: default to the config's.

        Returns:
            [`ShowAttendTellOutput`].
        """
        config = self.config
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        state = cache if cache is not None else past_key_values
        if decoder_input_ids is None:
            decoder_input_ids = input_ids
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass input_ids (or decoder_input_ids) or labels")
            decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        if use_cache is None:
            use_cache = config.use_cache and labels is None

        # 1. encoder (skipped when a cache or precomputed features are given)
        encoder_hidden_states = None
        if state is not None:
            features = state.features
        else:
            if encoder_outputs is None:
                if pixel_values is None:
                    raise ValueError("pass pixel_values or encoder_outputs")
                encoder_outputs = self.encoder(
                    pixel_values, output_hidden_states=output_hidden_states, return_dict=True
                )
            elif not isinstance(encoder_outputs, ModelOutput):
                encoder_outputs = BaseModelOutput(
                    last_hidden_state=encoder_outputs[0],
                    hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                )
            features = encoder_outputs.last_hidden_state
            encoder_hidden_states = encoder_outputs.hidden_states
        if not torch.is_autocast_enabled(features.device.type):  # under autocast each op picks its dtype
            features = features.to(self.dtype)

        # 2. decoder (with labels it learns where each row's targets end, and may skip the padding after)
        targets = lengths = None
        if labels is not None:
            targets = labels.masked_fill(labels == config.pad_token_id, -100)
            if state is None and not use_cache:
                steps = torch.arange(1, targets.shape[1] + 1, device=targets.device)
                lengths = ((targets != -100) * steps).amax(dim=1)
        decoded = self.decoder(decoder_input_ids, features, state, lengths=lengths)

        # 3. loss
        loss = None
        if labels is not None:
            loss = self.caption_loss(decoded, targets)

        # 4. output
        outputs = ShowAttendTellOutput(
            loss=loss,
            logits=decoded.logits,
            decoder_hidden_states=(decoded.lstm_outputs,) if output_hidden_states else None,
            cross_attentions=(decoded.alphas,) if output_attentions else None,
            attention_maps=decoded.alphas if output_attentions else None,
            encoder_last_hidden_state=features,
            encoder_hidden_states=encoder_hidden_states,
        )
        if use_cache:
            outputs[CACHE_NAME] = decoded.cache
        return outputs if return_dict else outputs.to_tuple()

    def caption_loss(self, decoded: DecoderOutput, targets: torch.Tensor) -> torch.Tensor:
        """
        Eq. 14 of the paper: cross-entropy of the next words (targets `(rows, steps)`, -100 ignored) plus
        `alpha_c * sum_i (1 - sum_t alpha_ti)^2` (as a mean): over the words of a caption, every position
        should receive about one unit of attention in total. Padded steps do not count.
        """
        if decoded.decoded_positions is not None:
            logits, scored_targets = decoded.decoded_logits, targets[decoded.decoded_positions]
        else:
            logits, scored_targets = decoded.logits.flatten(0, 1), targets.flatten()
        cross_entropy = F.cross_entropy(logits.float(), scored_targets, ignore_index=-100)
        valid_steps = (targets != -100).unsqueeze(-1).to(decoded.alphas.dtype)
        attention_totals = (decoded.alphas * valid_steps).sum(dim=1)
        penalty = ((1.0 - attention_totals) ** 2).mean()
        return cross_entropy + self.config.alpha_c * penalty.float()

    # -- generate() integration -----------------------------------------------------------------------

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:  # see OVERRIDDEN_PRIVATE_METHODS
        # generate() would copy each image's features once per beam (or returned sequence). The decoder
        # groups rows by image instead, so keep one copy per image; a state being continued gets its rows
        # repeated the way the decoder inputs are.
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=False, input_ids=input_ids, **model_kwargs
        )
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        state = model_kwargs.get(CACHE_NAME)
        if isinstance(state, ShowAttendTellCache) and expand_size > 1:
            state.repeat_rows(expand_size)
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: ShowAttendTellCache | None = None,
        cache: ShowAttendTellCache | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """
        The inputs of one `forward` call of `generate()`: the tokens the state has not consumed yet (all of
        them at first, the last one after), the state and the features; every other model keyword that
        `forward` takes (e.g. `output_attentions`, `decoder_attention_mask`) is passed through unchanged.
        """
        state = cache if cache is not None else past_key_values
        if state is not None:
            if state.hidden.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"the cache holds {state.hidden.shape[0]} rows but generate() decodes {input_ids.shape[0]}: "
                    "continue a caption with the cache of a generate() call that returned one row per sequence "
                    "(greedy or sampling), with the same decoder_input_ids it returned"
                )
            input_ids = input_ids[:, state.get_seq_length() :]
        # generate() passes the encoder's input and return_dict itself; its own bookkeeping (cache_position,
        # next_sequence_length, ...) is not a parameter of forward
        passed_through = set(inspect.signature(self.forward).parameters) - {
            "input_ids",
            "pixel_values",
            "return_dict",
        }
        return {
            **{name: value for name, value in kwargs.items() if name in passed_through},
            "decoder_input_ids": input_ids,
            "encoder_outputs": encoder_outputs,
            CACHE_NAME: state,
            "use_cache": use_cache is not False,
        }

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """
        `GenerationMixin.generate`, plus one convenience: with `output_attentions=True` and
        `return_dict_in_generate=True` the output has `attention_maps`, a tensor of shape
        `(num_sequences, generated_tokens, num_pixels)` holding, for every returned sequence, the attention of
        the step that produced each of its words (zeros after the sequence ended). `cross_attentions` holds,
        per step, one `(rows, 1, num_pixels)` tensor per decoder layer, as for every encoder-decoder.
        `config.output_attentions` and `config.output_hidden_states` apply when the arguments are not given.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        for name in ("output_attentions", "output_hidden_states"):  # the config's, unless given
            if (
                name not in kwargs
                and getattr(self.config, name, False)
                and not getattr(generation_config, name)
            ):
                kwargs[name] = True
        outputs = super().generate(*args, **kwargs)
        if isinstance(outputs, ModelOutput) and getattr(outputs, "cross_attentions", None):
            outputs["attention_maps"] = self._attention_maps_per_sequence(outputs)
        return outputs

    def _attention_maps_per_sequence(self, outputs: ModelOutput) -> torch.Tensor:
        """
        Follows each returned sequence through generate()'s per-step attentions.

        Returns `(num_sequences, generated_tokens, num_pixels)`, `generated_tokens = sequences.shape[1] - 1`:
        row `t` is the attention of the step that produced the sequence's word `t + 1`, and zeros after the
        sequence's `<end>`. Beam search may run more steps than the longest returned sequence has tokens (its
        search goes on after the winners ended); `beam_indices` has one column per returned token, so only
        those steps are read.
        """
        # per step: a tuple with one (rows, 1, num_pixels) tensor per decoder layer
        step_maps = [step[-1][:, -1] for step in outputs.cross_attentions]  # (rows, num_pixels) each
        sequences = outputs.sequences
        num_sequences, generated_tokens = sequences.shape[0], sequences.shape[1] - 1
        beam_indices = getattr(outputs, "beam_indices", None)
        maps = step_maps[0].new_zeros(num_sequences, generated_tokens, step_maps[0].shape[-1])
        for t in range(min(generated_tokens, len(step_maps))):
            if beam_indices is not None:
                rows = beam_indices[:, t].long()
                present = rows >= 0
                maps[present, t] = step_maps[t][rows[present]]
            else:
                maps[:, t] = step_maps[t]
        eos_ids = self.generation_config.eos_token_id
        eos_ids = torch.tensor(self.config.eos_token_id if eos_ids is None else eos_ids, device=maps.device)
        is_end = torch.isin(sequences[:, 1:], eos_ids).long()
        words = (is_end.cumsum(dim=1) - is_end) == 0  # no <end> before: the words up to and including <end>
        return maps * words.unsqueeze(-1).to(maps.dtype)


__all__ = [
    "ShowAttendTellCache",
    "ShowAttendTellEncoder",
    "ShowAttendTellForConditionalGeneration",
    "ShowAttendTellOutput",
    "ShowAttendTellPreTrainedModel",
    "convert_torchvision_resnet_state_dict",
]
