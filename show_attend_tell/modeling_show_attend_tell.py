"""Show, Attend and Tell (Xu et al., 2015) with soft attention, as a transformers model.

An image travels through this file top to bottom:

1. `ShowAttendTellEncoder`: a ResNet without its classification head turns `pixel_values`
   (batch, 3, 256, 256) into a feature map, adaptively average-pooled to a square grid and flattened
   to `features` (batch, num_pixels, encoder_dim), e.g. (batch, 196, 2048) for ResNet-101 at 14 x 14.
2. `ShowAttendTellAttention`: for each decoding step, scores every grid position against the LSTM
   state and returns the attention weights `alpha` (rows, num_pixels) and the weighted image context.
3. `ShowAttendTellDecoder`: an LSTM cell fed with the previous word and the gated context predicts the
   next word, one step at a time.
4. `ShowAttendTellForConditionalGeneration`: ties both together with the transformers conventions
   (loss, `generate()` with greedy / beam search / sampling, save and load).

Several decoder rows may share one image: the captions of one image during training, or the beams
(and returned sequences) of one image during `generate()`. Rows are grouped by image in
`repeat_interleave` order (rows `i * k ... i * k + k - 1` belong to image `i`), so image features and
their attention projection are stored once per image and never copied per row.

Inference without gradients (`generate()`, evaluation) takes a faster route through the same function:
see `ShowAttendTellDecoder` (a decoding step with its weights prepared once, float32 state under bf16
autocast) and `ShowAttendTellEncoder._cpu_inference_chunk` (the ResNet a few images at a time on a CPU).
Work that cannot change a result is left out: in beam search, the images whose search has ended
(`ShowAttendTellCache.images_to_decode`); in training, the padding after each caption
(`ShowAttendTellDecoder._forward_by_length`).
Fast captioning: `model.to(memory_format=torch.channels_last)`, channels_last `pixel_values`, and
`generate()` under `torch.inference_mode()` and `torch.autocast(device_type, dtype=torch.bfloat16)`.
"""

from __future__ import annotations

import re
import shutil
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, ResNetModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration_show_attend_tell import PIPELINE_DECLARATION, RESNET_DEPTHS, ShowAttendTellConfig

try:  # transformers 5.x: initialisers that leave weights loaded from a checkpoint untouched
    from transformers import initialization as init
except ImportError:  # transformers 4.x skips loaded modules itself
    from torch.nn import init

try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:
    _ALL_CACHE_NAMES = ["past_key_values"]

# generate() passes the decoding state to `forward` and reads it back from the output under one name,
# which changed inside transformers 5.x ("past_key_values" up to 5.2x, then "cache"). A state returned
# under the other name would be silently dropped and decoding would restart from scratch every step.
CACHE_NAME: str = _ALL_CACHE_NAMES[0]

# The image-to-text auto class is AutoModelForVision2Seq in transformers 4.x and
# AutoModelForImageTextToText in 5.x (late 4.x has both).
IMAGE_TO_TEXT_AUTO_CLASSES = [
    name for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq") if hasattr(transformers, name)
]

# On a GPU a small decoding step costs its kernel launches, not its arithmetic: leaving out finished images
# (a host synchronisation and a few copies per step) pays from about this many rows (batch x beams) on.
# Measured on an H200, beam 5: 9% slower at 1,280 rows, 22% faster at 5,120.
GPU_ROWS_WORTH_SKIPPING = 4096
# oneDNN's products with weights stored in its own layout, used for bf16 decoding on a CPU
_PACKED_BF16_PRODUCTS = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
# The attention of the images still searching reads the features of a subset of the batch that holds them;
# the subset is copied afresh only once at most this share of it is still searching. A copy costs about
# two steps' reading of the copied features; fewer copies pay (measured on the CPU: each copy at 75%
# cost more than its savings when few steps were left).
ATTENDED_SHARE_TO_COMPACT = 0.5
# Captured decoding steps (`ShowAttendTellDecoder.capture_steps`) kept per decoder, one per step shape (rows,
# images, dtype), the least recently used dropped first: a collection's full batches and its last one. Each
# holds its own copy of the image features and keys and the step's outputs (about 1.6 GB at 1,024 images).
CAPTURED_STEPS_KEPT = 2

# Per thread and model: which images of the running beam search are still searching (see
# `ShowAttendTellForConditionalGeneration._check_early_stop_heuristic`).
_beam_search_progress = threading.local()

DEFAULT_NUM_BEAMS = 3
DEFAULT_MAX_NEW_TOKENS = 51  # 50 words and <end>

# torchvision's ImageNet checkpoints (the file name is what torchvision caches them under).
TORCHVISION_RESNET_URLS = {
    ("resnet50", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ("resnet50", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    ("resnet101", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    ("resnet101", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    ("resnet152", "IMAGENET1K_V1"): "https://download.pytorch.org/models/resnet152-394f9c45.pth",
    ("resnet152", "IMAGENET1K_V2"): "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}


# --------------------------------------------------------------------------------------------------
# Outputs and decoding state
# --------------------------------------------------------------------------------------------------


@dataclass
class _ShowAttendTellOutputFields(ModelOutput):
    """
    Output of [`ShowAttendTellForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Cross-entropy over the non-padding targets plus `alpha_c` times the doubly-stochastic penalty.
        logits (`torch.FloatTensor` of shape `(rows, steps, vocab_size)`):
            Scores of the next word at every decoded step.
        decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            One tensor of shape `(rows, steps, decoder_dim)`: the LSTM output at every step.
        decoder_attentions: always `None` (the decoder does not attend over its own words); kept
            because generate() reads it.
        cross_attentions (`torch.FloatTensor` of shape `(rows, steps, num_pixels)`, *optional*):
            The attention weights over the image grid at every step; each row sums to one.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(images, num_pixels, encoder_dim)`):
            The flattened image features the decoder attended over.
        encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            The ResNet's stem and stage outputs, `(images, channels, height, width)` each.
        cache / past_key_values (`ShowAttendTellCache`, *optional*):
            The decoding state after the last step, under the name the installed transformers reads.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: torch.FloatTensor | None = None
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


class ImagesToDecode(NamedTuple):
    """What the next beam-search step decodes (see `ShowAttendTellCache.images_to_decode`)."""

    searching: torch.Tensor  # (searching_images,) indices into the batch of the images still searching
    attended: torch.Tensor | None  # (attended_images,) the images of `keys` and `compute_features`; None: all
    keys: torch.Tensor  # (attended_images, num_pixels, attention_dim)
    compute_features: torch.Tensor  # (attended_images, num_pixels, encoder_dim)


class ShowAttendTellCache:
    """
    Decoding state of the LSTM decoder, carried between `generate()` steps.

    An LSTM has no keys and values to cache: it carries its state `(hidden, cell)`, one row per decoded
    sequence, plus the image features and their attention projection, which are computed once per
    image and shared by all of that image's rows. Beam search only reorders rows within an image, so
    `reorder_cache` touches the small per-row state and never the features.

    Args:
        features (`torch.Tensor` of shape `(images, num_pixels, encoder_dim)`)
        projected_features (`torch.Tensor` of shape `(images, num_pixels, attention_dim)`)
        hidden, cell (`torch.Tensor` of shape `(rows, decoder_dim)`)
        seq_length (`int`): how many tokens the state has consumed.
        compute_features (`torch.Tensor` of shape `(images, num_pixels, encoder_dim)`, *optional*):
            The features in the dtype the inference step multiplies them in (`features` itself when it
            already has that dtype); made by the decoder.
    """

    is_compileable = False  # read by generate() on CUDA; this state cannot be a static cache

    def __init__(
        self,
        features: torch.Tensor,
        projected_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        seq_length: int = 0,
        compute_features: torch.Tensor | None = None,
    ) -> None:
        self.features = features
        self.projected_features = projected_features
        self.hidden = hidden
        self.cell = cell
        self.seq_length = seq_length
        self.compute_features = compute_features
        self.scratch: torch.Tensor | None = None  # reused by the attention from step to step
        # Beam search only: which images are still searching (bool, (images,)), set by the model before each
        # step, and what the inference step decodes (see `images_to_decode`).
        self.searching: torch.Tensor | None = None
        self.decoded_images: ImagesToDecode | None = None
        # The decoder's weights prepared for the inference step (`_InferenceWeights`), found once per decoding
        # rather than at every step: the cache's attention keys already belong to those weights.
        self.inference_weights = None

    def __getstate__(self) -> dict:
        # prepared weights can hold oneDNN-packed tensors, which cannot be copied; the decoder remakes them
        return {**self.__dict__, "inference_weights": None}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def images_to_decode(self, keys: torch.Tensor, compute_features: torch.Tensor) -> ImagesToDecode | None:
        """
        What the next beam-search step has to decode, or None to decode every row.

        An image whose search has ended keeps its finished captions whatever its beams do next, so its rows
        need not be computed: the step decodes the rows of the images still searching. Their attention reads
        the keys and features of a subset of the batch that holds them: the whole batch at first, then a
        copy of the searching images' made whenever at most `ATTENDED_SHARE_TO_COMPACT` of the subset is
        still searching (copying at every step would cost more than it saves).
        """
        if self.searching is None:
            return None
        if self.searching.device.type != "cpu" and self.hidden.shape[0] < GPU_ROWS_WORTH_SKIPPING:
            return None
        searching_count = int(self.searching.sum())
        if searching_count in (0, self.searching.numel()):
            return None
        searching = self.searching.nonzero().squeeze(1)
        previous = self.decoded_images
        if previous is None:
            attended, attended_keys, attended_features = None, keys, compute_features
        else:
            attended, attended_keys, attended_features = previous[1:]
        attended_count = self.searching.numel() if attended is None else attended.numel()
        # A search that has ended does not resume, so the subset keeps holding every searching image; the
        # check costs nothing next to a step and guards the step against reading another image's features.
        lost = attended is not None and not bool(torch.isin(searching, attended).all())
        if lost or searching_count <= ATTENDED_SHARE_TO_COMPACT * attended_count:
            attended = searching
            attended_keys = keys.index_select(0, searching)
            attended_features = compute_features.index_select(0, searching)
        self.decoded_images = ImagesToDecode(searching, attended, attended_keys, attended_features)
        return self.decoded_images

    def reorder_cache(self, beam_idx: torch.LongTensor) -> ShowAttendTellCache:
        """Selects the rows that survive a beam-search step, in place (generate ignores the return value)."""
        beam_idx = beam_idx.to(self.hidden.device)
        self.hidden = self.hidden.index_select(0, beam_idx)
        self.cell = self.cell.index_select(0, beam_idx)
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={self.features.shape[0]}, rows={self.hidden.shape[0]}, "
            f"seq_length={self.seq_length})"
        )


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


def resnet_architecture_name(config: ShowAttendTellConfig) -> str:
    """The torchvision name of the encoder's ResNet ("resnet101"), or a ValueError if there is none."""
    depths = list(config.encoder_config.depths)
    for name, known_depths in RESNET_DEPTHS.items():
        if depths == known_depths and config.encoder_config.layer_type == "bottleneck":
            return name
    raise ValueError(
        f"No torchvision ImageNet checkpoint matches an encoder with depths {depths}; "
        f"supported: {', '.join(f'{name} {d}' for name, d in RESNET_DEPTHS.items())}"
    )


def convert_torchvision_resnet_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Renames a torchvision ResNet state dict to the parameter names of transformers' `ResNetModel`.

    Both networks are the same ResNet v1.5 (stride in the 3 x 3 convolution of a bottleneck), so the
    mapping is a pure renaming; the classification layer `fc` is dropped.
    """
    renamed = {}
    for name, tensor in state_dict.items():
        if name.startswith("fc."):
            continue
        new_name = re.sub(r"^conv1\.", "embedder.embedder.convolution.", name)
        new_name = re.sub(r"^bn1\.", "embedder.embedder.normalization.", new_name)
        match = re.match(r"^layer(\d+)\.(\d+)\.(.+)$", new_name)
        if match:
            stage, block, rest = int(match.group(1)) - 1, match.group(2), match.group(3)
            rest = re.sub(r"^conv(\d)\.", lambda m: f"layer.{int(m.group(1)) - 1}.convolution.", rest)
            rest = re.sub(r"^bn(\d)\.", lambda m: f"layer.{int(m.group(1)) - 1}.normalization.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
            new_name = f"encoder.stages.{stage}.layers.{block}.{rest}"
        if new_name == name:
            raise KeyError(f"unexpected parameter in a torchvision ResNet state dict: {name}")
        renamed[new_name] = tensor
    return renamed


# Inference on a CPU runs the ResNet a few images at a time (see ShowAttendTellEncoder._cpu_inference_chunk):
# ~1.4x the images/s of one call at batch 32, on 2 cores with bf16.
CPU_ENCODER_CHUNK_BYTES = 16 * 2**20


class ShowAttendTellEncoder(nn.Module):
    """
    ResNet feature extractor: `pixel_values` (images, 3, H, W) -> features (images, num_pixels, encoder_dim).

    The ResNet's own grid is H / 32 on a side (8 x 8 at 256 px); it is adaptively average-pooled to
    `encoded_image_size` (14 x 14 by default, as in the paper's implementation).
    """

    main_input_name = "pixel_values"

    def __init__(self, config: ShowAttendTellConfig) -> None:
        super().__init__()
        self.config = config
        self.resnet = ResNetModel(config.encoder_config)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((config.encoded_image_size, config.encoded_image_size))

    def encode_grid(
        self, pixel_values: torch.FloatTensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The ResNet's last feature map at its native resolution, (images, encoder_dim, H/32, W/32)."""
        chunk = None if output_hidden_states else self._cpu_inference_chunk(pixel_values)
        if chunk is not None and chunk < pixel_values.shape[0]:
            parts = [
                self.resnet(part, return_dict=True).last_hidden_state for part in pixel_values.split(chunk)
            ]
            return torch.cat(parts), None
        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        return outputs.last_hidden_state, outputs.hidden_states

    def _cpu_inference_chunk(self, pixel_values: torch.Tensor) -> int | None:
        """
        Images per ResNet call for inference on a CPU (None elsewhere). A ResNet's activations for a whole
        batch outgrow the CPU's caches, and glibc's allocator hands every tensor above 32 MB back to the
        kernel when it is freed, so each layer's output is mapped, zeroed and faulted in afresh; a few
        images at a time keep the largest activation near CPU_ENCODER_CHUNK_BYTES (results are the same).
        """
        if self.training or torch.is_grad_enabled() or pixel_values.device.type != "cpu":
            return None
        config = self.config.encoder_config
        pixels = pixel_values.shape[-2] * pixel_values.shape[-1]
        # the largest activations: the stem's convolution (H/2 x W/2) and the first stage (H/4 x W/4)
        elements = max(config.embedding_size * pixels // 4, config.hidden_sizes[0] * pixels // 16)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        else:
            dtype = self.resnet.embedder.embedder.convolution.weight.dtype
        element_size = torch.empty((), dtype=dtype).element_size()
        return max(1, CPU_ENCODER_CHUNK_BYTES // max(1, elements * element_size))

    def pool_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(images, encoder_dim, h, w) -> (images, encoded_image_size ** 2, encoder_dim)."""
        pooled = self.adaptive_pool(grid)
        return pooled.flatten(2).transpose(1, 2)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(images, 3, height, width)`): normalised images.
            output_attentions: accepted for the generate() interface; a ResNet has no attention.
            output_hidden_states: also return the stem and stage outputs of the ResNet.

        Returns:
            `BaseModelOutput` with `last_hidden_state` of shape `(images, num_pixels, encoder_dim)`.
        """
        grid, hidden_states = self.encode_grid(pixel_values, output_hidden_states=bool(output_hidden_states))
        features = self.pool_grid(grid)
        if return_dict is False:
            return (features, hidden_states) if output_hidden_states else (features,)
        return BaseModelOutput(last_hidden_state=features, hidden_states=hidden_states)

    def set_trainable_stages(self, num_stages: int) -> None:
        """
        Freezes the ResNet except its last `num_stages` stages (0 freezes all of it, the default of
        training; the paper's implementation fine-tunes the last three when asked to).
        """
        self.resnet.requires_grad_(False)
        stages = self.resnet.encoder.stages
        for stage in list(stages)[len(stages) - num_stages :] if num_stages > 0 else []:
            stage.requires_grad_(True)

    def load_imagenet_weights(self, variant: str = "IMAGENET1K_V1", progress: bool = True) -> None:
        """
        Loads torchvision's ImageNet weights for this ResNet (downloaded once into
        `$TORCH_HOME/hub/checkpoints`, under torchvision's own file name).

        `IMAGENET1K_V1` is the checkpoint of `torchvision.models.resnet101(pretrained=True)`, the one the
        specification's implementation used. The file is read with `weights_only=True`.
        """
        architecture = resnet_architecture_name(self.config)
        key = (architecture, variant)
        if key not in TORCHVISION_RESNET_URLS:
            raise ValueError(f"unknown ImageNet weights {variant!r}; choose IMAGENET1K_V1 or IMAGENET1K_V2")
        state_dict = torch.hub.load_state_dict_from_url(
            TORCHVISION_RESNET_URLS[key], progress=progress, map_location="cpu", weights_only=True
        )
        self.resnet.load_state_dict(convert_torchvision_resnet_state_dict(state_dict), strict=True)


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


# Additive attention forms a (rows, num_pixels, attention_dim) intermediate at every step: 64 MB in float32
# for 32 images x 5 beams. Streamed through main memory, it costs a CPU more than all of the decoder's matrix
# products together; cut into blocks that stay in the cache, it costs about a tenth of that.
CPU_ATTENTION_BLOCK_BYTES = 4 * 2**20


class ShowAttendTellAttention(nn.Module):
    """
    Soft (deterministic) attention: `alpha = softmax(w^T relu(W_f f + W_h h))` over the grid positions.

    The image side `W_f f` does not change while a caption is decoded, so it is computed once per image
    by `project_features` and reused at every step.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_projection = nn.Linear(encoder_dim, attention_dim)
        self.decoder_projection = nn.Linear(decoder_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """(images, num_pixels, encoder_dim) -> (images, num_pixels, attention_dim)."""
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
            features (`(images, num_pixels, encoder_dim)`), projected_features (`(images, num_pixels, attention_dim)`)
            hidden (`(rows, decoder_dim)`): the LSTM state of every row (rows = images * rows_per_image, grouped
                by image), or of the rows `row_ids` only (a subset of those, in any order).
            rows_per_image: needed with `row_ids`.

        Returns:
            context (`(rows, encoder_dim)`): the attention-weighted average of the features.
            alpha (`(rows, num_pixels)`): the attention weights.
        """
        images, num_pixels, _ = features.shape
        rows = hidden.shape[0]
        if row_ids is None:
            rows_per_image = rows // images
            row_image = torch.arange(rows, device=hidden.device) // rows_per_image
        else:
            row_image = row_ids // rows_per_image
        query = self.decoder_projection(hidden)
        scores = _AttentionScores.apply(
            projected_features, query, self.score.weight.view(-1), self.score.bias.view(()), row_image
        )
        alpha = scores.softmax(dim=-1)
        # one batched product per image serves all of its rows; a subset of rows is placed in the grouped
        # layout first (the other rows attend to nothing)
        grouped = alpha
        if row_ids is not None:
            grouped = alpha.new_zeros(images * rows_per_image, num_pixels).index_copy(0, row_ids, alpha)
        context = torch.bmm(grouped.view(images, rows_per_image, num_pixels), features).flatten(0, 1)
        if row_ids is not None:
            context = context.index_select(0, row_ids)
        return context, alpha

    @staticmethod
    def blocked_scores(
        keys: torch.Tensor,
        query: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        scratch: torch.Tensor | None = None,
        row_image: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The scores `w^T relu(keys + query) + b` of every row at every grid position, without materialising
        the whole `(rows, num_pixels, attention_dim)` intermediate on a CPU: it is computed a few rows at a
        time in one reused buffer that stays in the cache. All tensors in one dtype; no gradients.

        Args:
            keys (`(images, num_pixels, attention_dim)`): the projected features (`project_features`).
            query: the projected LSTM state, `(images, rows_per_image, attention_dim)` (rows grouped by image),
                or `(rows, attention_dim)` with `row_image`.
            weight (`(attention_dim,)`), bias (`()`): the score layer.
            scratch: the buffer returned by the previous call, reused when it is large enough.
            row_image (`(rows,)`): the image of each row of a `(rows, attention_dim)` query.

        Returns:
            scores (`(images, rows_per_image, num_pixels)`, or `(rows, num_pixels)` with `row_image`), and the
            buffer to pass to the next call.
        """
        images, num_pixels, attention_dim = keys.shape
        grouped = row_image is None
        # a block is a few images (each with all of its rows) or a few rows
        units = images if grouped else query.shape[0]
        per_unit = (query.shape[1] if grouped else 1) * num_pixels * attention_dim
        block = _attention_block(units, per_unit, keys)
        reusable = scratch is not None and scratch.numel() >= block * per_unit
        if not reusable or scratch.dtype != keys.dtype or scratch.device != keys.device:
            scratch = keys.new_empty(block * per_unit)
        scores = keys.new_empty(*query.shape[:-1], num_pixels)
        for start in range(0, units, block):  # one pass on a GPU
            stop = min(start + block, units)
            hidden = scratch[: (stop - start) * per_unit].view(*scores[start:stop].shape, attention_dim)
            if grouped:
                torch.add(keys[start:stop].unsqueeze(1), query[start:stop].unsqueeze(2), out=hidden)
            else:
                torch.index_select(keys, 0, row_image[start:stop], out=hidden)
                hidden.add_(query[start:stop].unsqueeze(1))
            hidden.relu_()
            torch.mv(hidden.view(-1, attention_dim), weight, out=scores[start:stop].view(-1))
        return scores.add_(bias), scratch


def attention_scores(
    keys: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """
    The attention scores as one expression: keys (images, num_pixels, attention_dim), query (images,
    rows_per_image, attention_dim), weight (attention_dim,), bias () -> (images, rows_per_image, num_pixels).
    What `fused_attention_scores` compiles.
    """
    return (torch.relu(keys.unsqueeze(1) + query.unsqueeze(2)) * weight).sum(-1) + bias


_compiled_attention_scores = None


def fused_attention_scores(
    keys: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`attention_scores` compiled into one kernel (compiled on first use, for any shape)."""
    global _compiled_attention_scores
    if _compiled_attention_scores is None:
        _compiled_attention_scores = torch.compile(attention_scores, dynamic=True)
    return _compiled_attention_scores(keys, query, weight, bias)


def _attention_block(units: int, elements_per_unit: int, like: torch.Tensor) -> int:
    """How many images or rows the attention takes at a time: all on a GPU, a cache-sized block on a CPU."""
    if like.device.type != "cpu":
        return max(units, 1)
    return max(1, min(units, CPU_ATTENTION_BLOCK_BYTES // (elements_per_unit * like.element_size())))


class _AttentionScores(torch.autograd.Function):
    """
    `scores[r, p] = w . relu(keys[row_image[r], p] + query[r]) + b` with gradients, for training.

    Autograd would keep the `(rows, num_pixels, attention_dim)` intermediate of every decoding step for the
    backward pass, twice (before and after the ReLU): 48 MB per step for 60 captions in float32, most of a
    training step's activation memory. Here it is computed in cache-sized blocks
    (`ShowAttendTellAttention.blocked_scores`), not kept, and recomputed block by block in the backward
    pass, at about the same speed. Computed in float32 also under bf16 autocast (a CPU is slower at bf16
    element-wise work, and the scores feed a softmax); the gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, keys, query, weight, bias, row_image):
        dtype = torch.promote_types(keys.dtype, torch.float32)
        with torch.autocast(keys.device.type, enabled=False):
            scores, _ = ShowAttendTellAttention.blocked_scores(
                keys.to(dtype), query.to(dtype), weight.to(dtype), bias.to(dtype), row_image=row_image
            )
        ctx.save_for_backward(keys, query, weight, bias, row_image)
        return scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_scores):
        keys, query, weight, bias, row_image = ctx.saved_tensors
        dtype = torch.promote_types(keys.dtype, torch.float32)
        num_pixels, attention_dim = keys.shape[1:]
        rows = query.shape[0]
        with torch.autocast(keys.device.type, enabled=False):
            keys_c, query_c, weight_c = keys.to(dtype), query.to(dtype), weight.to(dtype)
            grad_scores = grad_scores.to(dtype)
            grad_keys = torch.zeros_like(keys_c) if ctx.needs_input_grad[0] else None
            grad_query = query_c.new_empty(rows, attention_dim)
            grad_weight = weight_c.new_zeros(attention_dim)
            block = _attention_block(rows, num_pixels * attention_dim, keys_c)
            buffer = keys_c.new_empty(block, num_pixels, attention_dim)
            for start in range(0, rows, block):
                stop = min(start + block, rows)
                pre_activation = buffer[: stop - start]
                torch.index_select(keys_c, 0, row_image[start:stop], out=pre_activation)
                pre_activation.add_(query_c[start:stop].unsqueeze(1))
                activation = pre_activation.relu_()
                grad_block = grad_scores[start:stop]  # (block, num_pixels)
                grad_weight += (grad_block.reshape(1, -1) @ activation.view(-1, attention_dim)).squeeze(0)
                # d score / d pre-activation: w where the ReLU is open (sign of its output: 1), else 0
                grad_pre = activation.sign_().mul_(grad_block.unsqueeze(-1)).mul_(weight_c)
                torch.sum(grad_pre, dim=1, out=grad_query[start:stop])
                if grad_keys is not None:
                    grad_keys.index_add_(0, row_image[start:stop], grad_pre)
            grad_bias = grad_scores.sum()
        return (
            None if grad_keys is None else grad_keys.to(keys.dtype),
            grad_query.to(query.dtype),
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype),
            None,
        )


def _version_of(tensor: torch.Tensor) -> int:
    """The version counter of a tensor (bumped by in-place changes); -1 for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class _InferenceWeights:
    """
    The decoder's weights laid out for the inference step, in its compute dtype, made once and reused by
    every step and every `generate()` call until a parameter changes.

    The LSTM state `h` enters three products at each step (the attention query `W_h h`, the gate
    `f_beta(h)` and the LSTM's recurrent term `W_hh h`): they are stacked into one matrix, so one product
    serves all three. The recurrent term carries both LSTM biases.
    """

    def __init__(self, decoder: ShowAttendTellDecoder, dtype: torch.dtype) -> None:
        attention, lstm = decoder.attention, decoder.lstm
        with torch.no_grad():
            self.hidden_weight = torch.cat(
                [attention.decoder_projection.weight, decoder.gate.weight, lstm.weight_hh]
            ).to(dtype)
            self.hidden_bias = torch.cat(
                [attention.decoder_projection.bias, decoder.gate.bias, lstm.bias_hh + lstm.bias_ih]
            ).to(dtype)
            self.input_weight = lstm.weight_ih.detach().to(dtype)
            self.embedding = decoder.embedding.weight.detach().to(dtype)
            self.output_weight = decoder.output_layer.weight.detach().to(dtype)
            self.output_bias = decoder.output_layer.bias.detach().to(dtype)
            # attention scores, the LSTM cell and the initial state are computed in float32
            self.score_weight = attention.score.weight.detach().float().reshape(-1)
            self.score_bias = attention.score.bias.detach().float().reshape(())
            self.init_weight = torch.cat([decoder.init_hidden.weight, decoder.init_cell.weight]).float()
            self.init_bias = torch.cat([decoder.init_hidden.bias, decoder.init_cell.bias]).float()
            # the output layer in float32 as well, for the likeliest words of a low-precision step
            low_precision = dtype not in (torch.float32, torch.float64)
            self.exact_output_weight = decoder.output_layer.weight.detach().float() if low_precision else None
            self.exact_output_bias = decoder.output_layer.bias.detach().float() if low_precision else None
        self.dtype = dtype
        self.packed = {}
        if self.input_weight.device.type == "cpu" and dtype == torch.bfloat16 and _PACKED_BF16_PRODUCTS:
            # oneDNN's own layout of a weight matrix: a product then reads it as it is instead of
            # reordering the whole matrix at every call (10 to 20% faster for a step's few rows; same results)
            for name in ("hidden", "input", "output"):
                self.packed[name] = torch.ops.mkldnn._reorder_linear_weight(getattr(self, f"{name}_weight"))
                setattr(self, f"{name}_weight", None)  # only the packed copy is read
        self.attention_dim = attention.decoder_projection.out_features
        self.encoder_dim = decoder.gate.out_features
        self.decoder_dim = lstm.hidden_size

    def product(
        self,
        name: str,
        inputs: torch.Tensor,
        bias: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`inputs @ weight.T + bias + add` with the weight matrix called `name` (hidden, input or output)."""
        packed = self.packed.get(name)
        if packed is not None:
            if add is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(
                    inputs, add.contiguous(), packed, bias, "add"
                )
            return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")
        weight = getattr(self, f"{name}_weight")
        if add is not None:
            return torch.addmm(add if bias is None else add + bias, inputs, weight.t())
        return F.linear(inputs, weight, bias)


class _CapturedStep:
    """
    One decoding step of a fixed shape, recorded once as a CUDA graph and replayed at every step
    (`ShowAttendTellDecoder.capture_steps`): one launch instead of the step's few dozen kernels.

    A graph reads and writes fixed addresses, so the step has buffers of its own: `run` copies the state,
    the words and (for a new decoding) the image keys and features in, replays the graph, and returns copies
    of its outputs, which the next replay overwrites. On other devices `run` computes the same step eagerly
    on the same buffers: no faster, but the same path, so that it is tested wherever the tests run.
    """

    def __init__(
        self,
        decoder: ShowAttendTellDecoder,
        weights: _InferenceWeights,
        exact_logits: int,
        input_ids: torch.LongTensor,
        keys: torch.Tensor,
        compute_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
    ) -> None:
        self.weights = weights
        # Ordinary tensors, not inference tensors: later calls may run outside `torch.inference_mode()`,
        # where inference tensors cannot be written to.
        with torch.inference_mode(False), torch.no_grad():
            self.input_ids, self.hidden, self.cell = input_ids.clone(), hidden.clone(), cell.clone()
            self.keys, self.features = keys.clone(), compute_features.clone()
            self.keys_source = weakref.ref(keys)  # whose keys and features the buffers hold

            def step() -> tuple[torch.Tensor, ...]:
                with torch.autocast(keys.device.type, enabled=False):
                    logits, alpha, new_hidden, new_cell, _ = decoder._inference_step(
                        self.input_ids,
                        self.keys,
                        self.features,
                        self.hidden,
                        self.cell,
                        weights,
                        None,
                        exact_logits,
                    )
                return logits, alpha, new_hidden, new_cell

            self.step, self.graph = step, None
            if keys.device.type == "cuda":
                # Lazy initialisation (cuBLAS workspaces, compiled kernels) must happen before the capture,
                # on a side stream as CUDA graphs require.
                side = torch.cuda.Stream(keys.device)
                side.wait_stream(torch.cuda.current_stream(keys.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream(keys.device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.outputs = step()
            else:
                self.outputs = step()

    def run(
        self,
        input_ids: torch.LongTensor,
        keys: torch.Tensor,
        compute_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step for these inputs: logits, alpha, hidden, cell (fresh tensors)."""
        if self.keys_source() is not keys:  # another decoding used the buffers since
            self.keys.copy_(keys)
            self.features.copy_(compute_features)
            self.keys_source = weakref.ref(keys)
        self.input_ids.copy_(input_ids)
        self.hidden.copy_(hidden)
        self.cell.copy_(cell)
        if self.graph is not None:
            self.graph.replay()
        else:
            for output, value in zip(self.outputs, self.step(), strict=True):
                output.copy_(value)
        return tuple(output.clone() for output in self.outputs)


class DecoderOutput(NamedTuple):
    """What `ShowAttendTellDecoder.forward` returns (see there for the shapes)."""

    logits: torch.Tensor
    alphas: torch.Tensor
    lstm_outputs: torch.Tensor
    cache: ShowAttendTellCache | None
    # With `lengths`: the logits of the computed positions (positions, vocab_size) and those positions
    # as (row index, step index); the loss needs no others.
    decoded_logits: torch.Tensor | None = None
    decoded_positions: tuple[torch.Tensor, torch.Tensor] | None = None


class ShowAttendTellDecoder(nn.Module):
    """
    The LSTM that writes the caption. At step t, with state (h, c) from step t-1 and word w_{t-1}:

        context, alpha_t = attention(features, h)
        context = sigmoid(f_beta(h)) * context            # the gate of section 4.2.1 of the paper
        h, c = LSTMCell([embed(w_{t-1}); context], (h, c))
        logits_t = output_layer(dropout(h))

    The initial state is a linear function of the mean feature vector (section 3.1.2).

    Two implementations of a step compute the same function. `step` is the plain one, used whenever
    gradients are recorded or the module is in training mode. Inference (`generate()`, or any forward in
    eval mode under `torch.no_grad()` / `torch.inference_mode()`) uses a faster one while
    `fast_inference` is True (the default): the products of the LSTM state are one matrix product, weights
    are cast to the compute dtype once rather than at every step, the attention is computed in
    cache-sized blocks, identical rows (the beams of an image at the first step) are computed once, and
    the LSTM state, the attention weights and the attention scores stay in float32 under bf16 autocast.
    Under bf16, the logits of each row's `2 x num_beams` likeliest words, among which beam search chooses,
    are computed again in float32: bf16 rounds a logit of 15 to the nearest 0.06, enough to decide between
    two nearly equally likely captions.
    The compute dtype is the autocast dtype when autocast is on (e.g. `torch.autocast("cpu",
    dtype=torch.bfloat16)`), else the dtype of the weights. In float32 both give the same ids.

    `fuse_attention_scores = True` (off by default) computes the attention scores of the inference step with
    `torch.compile` instead: add, ReLU and score product become one kernel that never writes the
    `(rows, num_pixels, attention_dim)` intermediate. The first `generate()` then compiles it (about 10 s
    on a CPU, which needs a C++ compiler; Triton on a GPU), and later steps' attention is several times
    faster: worth it when captioning many images.

    `capture_steps = True` (off by default; for a CUDA device) records the inference step of each shape
    once as a CUDA graph (`_CapturedStep`) and replays it at every later step of every decoding of that
    shape: one launch instead of a few dozen small kernels, which is what a step costs on a GPU at moderate
    batch sizes. Every row is then decoded at every step (beam search's finished images too, since the shape
    is fixed); the ids are those of the step without it. Capturing costs two eager steps and the recording,
    once per shape; buffers of the step's size stay allocated for the `CAPTURED_STEPS_KEPT` latest shapes.
    On other devices it runs the same buffered step without a graph, which gains nothing.
    """

    def __init__(self, config: ShowAttendTellConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.attention = ShowAttendTellAttention(config.encoder_dim, config.decoder_dim, config.attention_dim)
        self.init_hidden = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.init_cell = nn.Linear(config.encoder_dim, config.decoder_dim)
        self.gate = nn.Linear(config.decoder_dim, config.encoder_dim)
        self.lstm = nn.LSTMCell(config.embed_dim + config.encoder_dim, config.decoder_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.output_layer = nn.Linear(config.decoder_dim, config.vocab_size)
        self.gradient_checkpointing = False
        self.fast_inference = True
        self.fuse_attention_scores = False
        self.capture_steps = False
        self._inference_weights_memo: tuple | None = None
        self._captured_steps: OrderedDict[tuple, _CapturedStep] = OrderedDict()

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
        Teacher-forced decoding of `input_ids` (rows, steps), continuing from `cache` when given.

        `lengths` (rows,), optional: how many steps of each row are needed (a caption's words and `<end>`; the
        rest is padding). Steps past a row's length are then not computed, and their logits, attention and
        LSTM outputs are zeros.

        Returns a `DecoderOutput`: logits (rows, steps, vocab_size), alphas (rows, steps, num_pixels), LSTM
        outputs (rows, steps, decoder_dim), the state after the last step, and with `lengths` the logits of
        the computed positions only.
        """
        rows, steps = input_ids.shape
        if cache is None:
            images = features.shape[0]
            if rows % images:
                raise ValueError(
                    f"{rows} token rows cannot be grouped evenly over {images} images: rows must be "
                    "images x rows_per_image, grouped by image"
                )
        if self.fast_inference and not self.training and not torch.is_grad_enabled():
            return DecoderOutput(*self._inference_forward(input_ids, features, cache))
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
            and bool((lengths < steps).any())
        ):
            return self._forward_by_length(embedded, cache, lengths)
        hidden, cell = cache.hidden, cache.cell
        all_alphas, all_hidden = [], []
        for t in range(steps):
            alpha, hidden, cell = self._checkpointed_step(
                embedded[:, t], cache.features, cache.projected_features, hidden, cell
            )
            all_alphas.append(alpha)
            all_hidden.append(hidden)
        lstm_outputs = torch.stack(all_hidden, dim=1)
        logits = self.output_layer(self.dropout(lstm_outputs))
        new_cache = ShowAttendTellCache(
            cache.features, cache.projected_features, hidden, cell, cache.seq_length + steps
        )
        return DecoderOutput(logits, torch.stack(all_alphas, dim=1), lstm_outputs, new_cache)

    def _checkpointed_step(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.gradient_checkpointing and self.training:
            # transformers sets _gradient_checkpointing_func when checkpointing is enabled
            return self._gradient_checkpointing_func(self.step, *args)
        return self.step(*args)

    def _forward_by_length(
        self, embedded: torch.Tensor, cache: ShowAttendTellCache, lengths: torch.LongTensor
    ) -> DecoderOutput:
        """
        `forward` for rows of different lengths: the rows are sorted longest first, so that the rows still
        running at step t are the first `running[t]` ones, and each step computes only those. Finished
        captions cost nothing (with Flickr30K's caption lengths, about half the steps of a batch padded to
        its longest caption would be padding).
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
            alpha, hidden, cell = self._checkpointed_step(
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

    # -- inference ------------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # The inference weights are a cache: copies and pickles of the module rebuild them (oneDNN's packed
        # weights cannot be copied or pickled)
        state = super().__getstate__().copy()
        state["_inference_weights_memo"] = None
        state["_captured_steps"] = OrderedDict()  # CUDA graphs cannot be copied either
        return state

    def _run_captured_step(
        self,
        weights: _InferenceWeights,
        exact_logits: int,
        input_ids: torch.LongTensor,
        keys: torch.Tensor,
        compute_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        `_inference_step` through the captured step of this shape, recorded on first use (see
        `capture_steps`): logits, alpha, hidden, cell.
        """
        key = (
            input_ids.shape[0],
            tuple(keys.shape),
            tuple(compute_features.shape),
            compute_features.dtype,
            exact_logits,
            self.fuse_attention_scores,
            keys.device,
        )
        captured_steps = self._captured_steps
        if any(captured.weights is not weights for captured in captured_steps.values()):
            captured_steps.clear()  # the weights changed: the steps recorded with the old ones are of no use
        captured = captured_steps.get(key)
        if captured is None:
            captured = _CapturedStep(
                self, weights, exact_logits, input_ids, keys, compute_features, hidden, cell
            )
            captured_steps[key] = captured
            while len(captured_steps) > CAPTURED_STEPS_KEPT:
                captured_steps.popitem(last=False)
        captured_steps.move_to_end(key)
        return captured.run(input_ids, keys, compute_features, hidden, cell)

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype of the inference step's matrix products: autocast's when it is on, else the weights'."""
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.output_layer.weight.dtype

    def _inference_weights(self, dtype: torch.dtype) -> _InferenceWeights:
        # Valid until a parameter is replaced, moved or modified in place (which bumps its version counter).
        key = (
            dtype,
            *((p.data_ptr(), _version_of(p), p.dtype, p.device, p.shape) for p in self.parameters()),
        )
        memo = getattr(self, "_inference_weights_memo", None)
        if memo is None or memo[0] != key:
            memo = (key, _InferenceWeights(self, dtype))
            self._inference_weights_memo = memo
        return memo[1]

    def _inference_forward(
        self,
        input_ids: torch.LongTensor,
        features: torch.Tensor,
        cache: ShowAttendTellCache | None,
        rows_per_image: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ShowAttendTellCache]:
        """
        `forward` without gradients: the same function, computed as described in the class docstring.
        `rows_per_image`: how many rows each image has (beams), when `input_ids` holds one row per image.
        """
        rows, steps = input_ids.shape
        if cache is None:
            images = features.shape[0]
            copies = rows // images
            grouped = input_ids.view(images, copies, steps)
            if copies > 1 and bool((grouped == grouped[:, :1]).all()):
                # Every row of an image reads the same words (generate's first step: <start> for every
                # beam): decode one row per image and copy the results.
                logits, alphas, outputs, cache = self._inference_forward(
                    grouped[:, 0], features, None, copies
                )
                cache.hidden = cache.hidden.repeat_interleave(copies, dim=0)
                cache.cell = cache.cell.repeat_interleave(copies, dim=0)
                return (
                    logits.repeat_interleave(copies, dim=0),
                    alphas.repeat_interleave(copies, dim=0),
                    outputs.repeat_interleave(copies, dim=0),
                    cache,
                )
        device_type = input_ids.device.type
        dtype = self.compute_dtype(device_type)
        weights = None if cache is None else cache.inference_weights
        if weights is None or weights.dtype != dtype:
            weights = self._inference_weights(dtype)
        features = features if cache is None else cache.features
        compute_features = None if cache is None else cache.compute_features
        if compute_features is None or compute_features.dtype != weights.dtype:
            # Kept in its memory layout: the batched products read (images, num_pixels, encoder_dim) as well
            # as its transpose, which is what a channels-first encoder's output is.
            compute_features = features.to(weights.dtype)
            if not (compute_features.is_contiguous() or compute_features.transpose(1, 2).is_contiguous()):
                compute_features = compute_features.contiguous()
        if cache is None:
            # The attention keys are made under the caller's autocast, through the module (hooks see it).
            keys = self.attention.project_features(compute_features).float()
            with torch.autocast(device_type, enabled=False):
                # the mean feature as a matrix product: a reduction over the middle dimension is slow
                ones = compute_features.new_ones(1, 1, compute_features.shape[1])
                mean_features = torch.matmul(ones, compute_features).squeeze(1).float() / ones.shape[-1]
                hidden, cell = F.linear(mean_features, weights.init_weight, weights.init_bias).chunk(2, dim=1)
            cache = ShowAttendTellCache(
                features,
                keys,
                hidden.repeat_interleave(rows // images, dim=0),
                cell.repeat_interleave(rows // images, dim=0),
            )
        keys = cache.projected_features.float()
        hidden, cell, scratch = cache.hidden.float(), cache.cell.float(), cache.scratch
        # beam search picks among the 2 x num_beams likeliest words of each row
        exact_logits = 2 * (rows_per_image or rows // keys.shape[0])

        def next_cache(hidden, cell, consumed, scratch, decoded_images=None) -> ShowAttendTellCache:
            """The state after `consumed` more words."""
            state = ShowAttendTellCache(
                cache.features, keys, hidden, cell, cache.seq_length + consumed, compute_features
            )
            state.scratch, state.decoded_images, state.inference_weights = scratch, decoded_images, weights
            return state

        if self.capture_steps and steps == 1 and cache.seq_length > 0:  # every step after the first
            logits, alpha, hidden, cell = self._run_captured_step(
                weights, exact_logits, input_ids[:, 0], keys, compute_features, hidden, cell
            )
            new_cache = next_cache(hidden, cell, 1, scratch)
            return logits.unsqueeze(1), alpha.unsqueeze(1), hidden.unsqueeze(1), new_cache
        decoded_images = cache.images_to_decode(keys, compute_features) if steps == 1 else None
        if decoded_images is not None:
            with torch.autocast(device_type, enabled=False):
                logits, alpha, hidden, cell, scratch = self._inference_step_for_images(
                    input_ids[:, 0], keys.shape[0], decoded_images, hidden, cell, weights, scratch
                )
            new_cache = next_cache(hidden, cell, 1, scratch, decoded_images)
            return logits.unsqueeze(1), alpha.unsqueeze(1), hidden.unsqueeze(1), new_cache
        all_logits, all_alphas, all_hidden = [], [], []
        with torch.autocast(device_type, enabled=False):
            for t in range(steps):
                logits, alpha, hidden, cell, scratch = self._inference_step(
                    input_ids[:, t], keys, compute_features, hidden, cell, weights, scratch, exact_logits
                )
                all_logits.append(logits)
                all_alphas.append(alpha)
                all_hidden.append(hidden)
        new_cache = next_cache(hidden, cell, steps, scratch)
        if steps == 1:  # generate()'s steps: no copies
            return (
                all_logits[0].unsqueeze(1),
                all_alphas[0].unsqueeze(1),
                all_hidden[0].unsqueeze(1),
                new_cache,
            )
        return (
            torch.stack(all_logits, dim=1),
            torch.stack(all_alphas, dim=1),
            torch.stack(all_hidden, dim=1),
            new_cache,
        )

    def _inference_step_for_images(
        self,
        input_ids: torch.LongTensor,
        images: int,
        decoded_images: ImagesToDecode,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        weights: _InferenceWeights,
        scratch: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        `_inference_step` for the rows of the images still searching (`ShowAttendTellCache.images_to_decode`).
        The other rows keep their state and get zero logits and attention, which beam search never reads.
        """
        searching, attended, keys, compute_features = decoded_images
        rows = input_ids.shape[0]
        rows_per_image = rows // images
        offsets = torch.arange(rows_per_image, device=searching.device)
        row_index = (searching.unsqueeze(1) * rows_per_image + offsets).view(-1)
        # where the searching images' rows sit among the attended images' rows
        if attended is None:
            attended_positions = searching
        elif attended.numel() == searching.numel():
            attended_positions = None  # the same images
        else:
            attended_positions = torch.searchsorted(attended, searching)
        attended_rows = None
        if attended_positions is not None:
            attended_rows = (attended_positions.unsqueeze(1) * rows_per_image + offsets).view(-1)
        logits, alpha, new_hidden, new_cell, scratch = self._inference_step(
            input_ids.index_select(0, row_index),
            keys,
            compute_features,
            hidden.index_select(0, row_index),
            cell.index_select(0, row_index),
            weights,
            scratch,
            2 * rows_per_image,
            attended_rows,
            rows_per_image,
        )
        return (
            logits.new_zeros(rows, logits.shape[1]).index_copy_(0, row_index, logits),
            alpha.new_zeros(rows, alpha.shape[1]).index_copy_(0, row_index, alpha),
            hidden.index_copy(0, row_index, new_hidden),
            cell.index_copy(0, row_index, new_cell),
            scratch,
        )

    def _inference_step(
        self,
        input_ids: torch.LongTensor,
        keys: torch.Tensor,
        compute_features: torch.Tensor,
        hidden: torch.Tensor,
        cell: torch.Tensor,
        weights: _InferenceWeights,
        scratch: torch.Tensor | None,
        exact_logits: int,
        attended_rows: torch.LongTensor | None = None,
        rows_per_image: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        `step` for inference. keys (images, num_pixels, attention_dim) float32; compute_features (images,
        num_pixels, encoder_dim) in the compute dtype; hidden, cell (rows, decoder_dim) float32. In a low
        precision, the `exact_logits` largest logits of each row are computed in float32 (`_exact_top_logits`).

        `attended_rows` (rows,) with `rows_per_image`, optional: the rows are those of some of the images
        only, at these positions among the `images x rows_per_image` rows of `keys`' images (the attention of
        the other positions is computed from a zero query and dropped).
        """
        images, rows = keys.shape[0], input_ids.shape[0]
        attention_dim, encoder_dim = weights.attention_dim, weights.encoder_dim
        # attention query, gate and recurrent term of the LSTM: one product
        from_hidden = weights.product("hidden", hidden.to(weights.dtype), weights.hidden_bias)
        query = from_hidden[:, :attention_dim].float()
        if attended_rows is not None:
            query = query.new_zeros(images * rows_per_image, attention_dim).index_copy_(
                0, attended_rows, query
            )
        else:
            rows_per_image = rows // images
        query = query.view(images, rows_per_image, attention_dim)
        if self.fuse_attention_scores:
            scores = fused_attention_scores(keys, query, weights.score_weight, weights.score_bias)
        else:
            scores, scratch = ShowAttendTellAttention.blocked_scores(
                keys, query, weights.score_weight, weights.score_bias, scratch
            )
        alpha = scores.softmax(dim=-1)  # (images, rows_per_image, num_pixels)
        # (images, rows_per_image, encoder_dim): one batched product per image serves all of its rows
        context = torch.bmm(alpha.to(weights.dtype), compute_features).view(-1, encoder_dim)
        alpha = alpha.view(-1, alpha.shape[-1])
        if attended_rows is not None:
            alpha, context = alpha.index_select(0, attended_rows), context.index_select(0, attended_rows)
        gate = torch.sigmoid(from_hidden[:, attention_dim : attention_dim + encoder_dim])
        lstm_input = torch.cat([F.embedding(input_ids, weights.embedding), gate * context], dim=1)
        gates = weights.product("input", lstm_input, add=from_hidden[:, attention_dim + encoder_dim :])
        input_gate, forget_gate, cell_gate, output_gate = gates.float().chunk(4, dim=1)
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
        hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
        logits = weights.product("output", hidden.to(weights.dtype), weights.output_bias)
        if weights.exact_output_weight is not None and exact_logits > 0:
            logits = self._exact_top_logits(logits, hidden, weights, exact_logits)
        return logits, alpha, hidden, cell, scratch

    @staticmethod
    def _exact_top_logits(
        logits: torch.Tensor, hidden: torch.Tensor, weights: _InferenceWeights, count: int
    ) -> torch.Tensor:
        """
        Low-precision logits (rows, vocab_size) -> float32 logits whose `count` largest per row are computed
        again in float32, from the float32 LSTM output and output layer.

        A bf16 logit is rounded to 8 significant bits: off by up to 0.03 to 0.06 at the magnitudes of a
        trained captioner's likely words (10 to 20), more than the gap between many pairs of candidate
        captions. Beam search
        chooses among each row's `2 x num_beams` best words, so those are made exact; the rest keep bf16's
        precision, which the softmax's normaliser barely feels.
        """
        top = logits.topk(min(count, logits.shape[1]), dim=1, sorted=False).indices
        exact = torch.baddbmm(
            weights.exact_output_bias[top].unsqueeze(2), weights.exact_output_weight[top], hidden.unsqueeze(2)
        )
        return logits.float().scatter_(1, top, exact.squeeze(2))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class ShowAttendTellPreTrainedModel(PreTrainedModel):
    config_class = ShowAttendTellConfig
    config: ShowAttendTellConfig
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


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, start_token_id: int) -> torch.Tensor:
    """Decoder inputs from targets: `<start>` then the targets without the last one; -100 becomes `<pad>`."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids == -100, pad_token_id)


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

    # -- accessors the library relies on -----------------------------------------------------------

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
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoder's state is an LSTM state, not keys and values: generate() must not build a DynamicCache.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        `PreTrainedModel.save_pretrained`. When the code files are saved with the weights (the classes are
        registered for the auto classes, as importing `show_attend_tell` does), the folder also loads with
        the image-to-text auto class and declares its own image-to-text pipeline (`custom_pipelines`):
        transformers 5.x would otherwise serve `pipeline("image-to-text", model=folder,
        trust_remote_code=True)` with a pipeline that asks for a text prompt. The pipeline's code files are
        copied next to the weights; a model whose code came from a folder without them is saved without
        the declaration.
        """
        pipeline_files = []
        if self._auto_class is not None:
            reference = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for name in IMAGE_TO_TEXT_AUTO_CLASSES:
                auto_map.setdefault(name, reference)
            self.config.auto_map = auto_map
            # Not imported by this file: transformers 4.x copies only a module's direct relative imports
            # into its cache, and the pipeline's own import of the image processing file would be missing.
            code_dir = Path(__file__).resolve().parent
            pipeline_files = [
                code_dir / f"{name}_show_attend_tell.py" for name in ("pipeline", "image_processing")
            ]
            custom_pipelines = dict(getattr(self.config, "custom_pipelines", None) or {})
            if all(path.is_file() for path in pipeline_files):
                custom_pipelines.update(PIPELINE_DECLARATION)
            else:  # a declaration without its code would break the folder's pipeline
                pipeline_files = []
                for task in PIPELINE_DECLARATION:
                    custom_pipelines.pop(task, None)
            if custom_pipelines or hasattr(self.config, "custom_pipelines"):
                self.config.custom_pipelines = custom_pipelines
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for path in pipeline_files:
                shutil.copyfile(path, Path(save_directory) / path.name)
        return result

    # -- forward -------------------------------------------------------------------------------------

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
            pixel_values (`torch.FloatTensor` of shape `(images, 3, height, width)`):
                Normalised images, as made by the image processor. Not needed with `encoder_outputs`.
            input_ids / decoder_input_ids (`torch.LongTensor` of shape `(rows, steps)`):
                Caption tokens fed to the decoder, starting with `<start>`. `rows` is a multiple of
                `images`: the rows of image `i` are `i * k ... i * k + k - 1` (several captions of one
                image, or the beams of one image). The model has no text encoder, so both names mean
                the decoder's input. Made from `labels` when not given.
            attention_mask / decoder_attention_mask (`(rows, steps)`):
                Accepted for API compatibility; padding is handled through `labels` (-100 or `<pad>`).
            labels (`torch.LongTensor` of shape `(rows, steps)`):
                Next-word targets aligned with the decoder inputs. `-100` and `<pad>` are ignored.
            encoder_outputs: precomputed `last_hidden_state` of shape `(images, num_pixels, encoder_dim)`.
            past_key_values / cache (`ShowAttendTellCache`): decoding state of the previous steps.
            use_cache: return the decoding state (defaults to `config.use_cache` without labels).
            output_attentions: return the attention weights as `cross_attentions` (always computed).
            output_hidden_states: return the LSTM outputs and the ResNet's intermediate feature maps.

        Returns:
            [`ShowAttendTellOutput`]: loss (with labels), logits `(rows, steps, vocab_size)`,
            `cross_attentions` `(rows, steps, num_pixels)`, the decoding state, encoder features.
        """
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        output_hidden_states = bool(output_hidden_states)
        state = cache if cache is not None else past_key_values
        if decoder_input_ids is None:
            decoder_input_ids = input_ids
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass input_ids (or decoder_input_ids) or labels")
            decoder_input_ids = shift_tokens_right(
                labels, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None

        if state is not None:
            features = state.features
            encoder_hidden_states = None
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

        targets = lengths = None
        if labels is not None:
            targets = labels.masked_fill(labels == self.config.pad_token_id, -100)
            if state is None and not use_cache:
                # each row is decoded up to its last target; the padding after it is not computed
                scored = targets != -100
                steps = torch.arange(1, scored.shape[1] + 1, device=scored.device)
                lengths = (scored * steps).amax(dim=1)
        decoded = self.decoder(decoder_input_ids, features, state, lengths=lengths)
        logits, alphas, lstm_outputs, new_state = decoded[:4]

        loss = None
        if labels is not None:
            if decoded.decoded_positions is not None:
                scored_logits, scored_targets = decoded.decoded_logits, targets[decoded.decoded_positions]
            else:
                scored_logits, scored_targets = logits.flatten(0, 1), targets.flatten()
            cross_entropy = F.cross_entropy(scored_logits.float(), scored_targets, ignore_index=-100)
            # Doubly-stochastic attention (eq. 14): over the words of a caption, every position should
            # receive about one unit of attention in total. Padded steps do not count.
            valid_steps = (targets != -100).unsqueeze(-1).to(alphas.dtype)
            attention_totals = (alphas * valid_steps).sum(dim=1)
            penalty = ((1.0 - attention_totals) ** 2).mean()
            loss = cross_entropy + self.config.alpha_c * penalty.float()

        outputs = ShowAttendTellOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=(lstm_outputs,) if output_hidden_states else None,
            cross_attentions=alphas if output_attentions is not False else None,
            encoder_last_hidden_state=features,
            encoder_hidden_states=encoder_hidden_states,
        )
        if use_cache:
            outputs[CACHE_NAME] = new_state
        return outputs if return_dict else outputs.to_tuple()

    # -- generate() integration -----------------------------------------------------------------------

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        # generate() would copy each image's features once per beam (or returned sequence). The decoder
        # groups rows by image instead, so keep one copy per image.
        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=False, input_ids=input_ids, **model_kwargs
        )
        if encoder_outputs is not None:
            model_kwargs["encoder_outputs"] = encoder_outputs
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: ShowAttendTellCache | None = None,
        cache: ShowAttendTellCache | None = None,
        encoder_outputs: BaseModelOutput | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> dict:
        state = cache if cache is not None else past_key_values
        if state is not None:
            # Only the tokens the LSTM has not consumed yet (the last one, after the first step).
            input_ids = input_ids[:, state.get_seq_length() :]
            state.searching = self._images_still_searching().get("searching")
        return {
            "decoder_input_ids": input_ids,
            "encoder_outputs": encoder_outputs,
            CACHE_NAME: state,
            "use_cache": True if use_cache is None else use_cache,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }

    def generate(self, *args, **kwargs):
        """
        `GenerationMixin.generate`, plus one convenience: with `output_attentions=True` and
        `return_dict_in_generate=True` the output has `attention_maps`, a tensor of shape
        `(num_sequences, generated_tokens, num_pixels)` holding, for every returned sequence, the
        attention of the step that produced each of its words (zeros after the sequence ended).

        Beam search decodes every image of the batch until the last one is done. Here the images whose
        search has ended cost nothing: their rows are not computed (the returned sequences and scores are
        the same). In their rows, the per-step `cross_attentions` are zeros and the per-step `scores` those
        of zero logits; with `output_logits` or `output_hidden_states` every row is computed.
        """
        generation_config = kwargs.get("generation_config") or self.generation_config
        per_step_outputs = any(
            kwargs.get(name, getattr(generation_config, name, False))
            for name in ("output_logits", "output_hidden_states")
        )
        progress = _beam_search_progress.__dict__.setdefault("by_model", {})
        previous = progress.get(id(self))
        # a captured step has a fixed shape: it decodes every row
        skip_finished_images = not per_step_outputs and not self.decoder.capture_steps
        progress[id(self)] = {"skip_finished_images": skip_finished_images}
        try:
            outputs = super().generate(*args, **kwargs)
        finally:
            if previous is None:
                progress.pop(id(self), None)
            else:
                progress[id(self)] = previous
        if isinstance(outputs, ModelOutput) and getattr(outputs, "cross_attentions", None):
            outputs["attention_maps"] = self._attention_maps_per_sequence(outputs)
        return outputs

    def _images_still_searching(self) -> dict:
        return getattr(_beam_search_progress, "by_model", {}).get(id(self), {})

    def _check_early_stop_heuristic(self, *args, **kwargs) -> torch.Tensor:
        """
        generate()'s beam search asks after every step whether each image's search can still change its
        result; the answer is kept for the next step, which then decodes only the images still searching.
        """
        still_searching = super()._check_early_stop_heuristic(*args, **kwargs)
        progress = self._images_still_searching()
        if progress.get("skip_finished_images"):
            searching = still_searching.view(-1)
            finished = kwargs.get("is_sent_finished")
            if kwargs.get("early_stopping") is True and finished is not None:
                # early_stopping=True: an image is done as soon as it has num_beams finished captions
                searching = searching & ~finished.all(dim=-1)
            progress["searching"] = searching
        return still_searching

    def _attention_maps_per_sequence(self, outputs: ModelOutput) -> torch.Tensor:
        """
        Follows each returned sequence through generate()'s per-step attentions.

        Returns `(num_sequences, generated_tokens, num_pixels)`, `generated_tokens = sequences.shape[1] - 1`:
        row `t` is the attention of the step that produced the sequence's word `t + 1`, and zeros after
        the sequence's `<end>` (padding). Beam search may run more steps than the longest returned
        sequence has tokens (its search goes on after the winners ended); `beam_indices` has one
        column per returned token, so only those steps are read.
        """
        step_maps = [step_alpha[:, -1] for step_alpha in outputs.cross_attentions]  # (rows, num_pixels) each
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
        return maps * self._generated_word_mask(sequences).unsqueeze(-1).to(maps.dtype)

    def _generated_word_mask(self, sequences: torch.Tensor) -> torch.Tensor:
        """`(num_sequences, generated_tokens)`: True for each generated word up to and including `<end>`."""
        generated = sequences[:, 1:]
        eos_ids = self.generation_config.eos_token_id
        if eos_ids is None:
            eos_ids = self.config.eos_token_id
        eos_ids = torch.tensor(eos_ids if isinstance(eos_ids, list) else [eos_ids], device=sequences.device)
        is_end = torch.isin(generated, eos_ids).long()
        ends_before = is_end.cumsum(dim=1) - is_end  # how many <end> tokens come before each position
        return ends_before == 0


__all__ = [
    "ShowAttendTellCache",
    "ShowAttendTellEncoder",
    "ShowAttendTellForConditionalGeneration",
    "ShowAttendTellOutput",
    "ShowAttendTellPreTrainedModel",
    "convert_torchvision_resnet_state_dict",
]
