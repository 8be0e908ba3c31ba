"""Configuration of the Show, Attend and Tell captioning model."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig, ResNetConfig

# The encoder of the specification: ResNet-101 as transformers' `ResNetConfig` describes it (the network of
# torchvision's `resnet101`, whose ImageNet weights `imagenet_weights_show_attend_tell.py` loads).
RESNET101: dict[str, Any] = {
    "depths": [3, 4, 23, 3],
    "hidden_sizes": [256, 512, 1024, 2048],
    "layer_type": "bottleneck",
    "embedding_size": 64,
}

PAD_TOKEN_ID = 0
START_TOKEN_ID = 1
END_TOKEN_ID = 2
UNK_TOKEN_ID = 3

#: The task of the model's own pipeline (pipeline_show_attend_tell.py), and its entry in a saved folder's
#: config.json (`custom_pipelines`). "pt" names the auto class that loads the model (resolved with
#: `getattr(transformers, name)`); "tf" is empty but present because transformers 4.x reads it.
PIPELINE_TASK = "image-to-text"
PIPELINE_DECLARATION: dict[str, Any] = {
    PIPELINE_TASK: {
        "impl": "pipeline_show_attend_tell.ShowAttendTellImageToTextPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    }
}


class ShowAttendTellConfig(PretrainedConfig):
    r"""
    Configuration of [`ShowAttendTellForConditionalGeneration`].

    The defaults reproduce the model of the specification: an ImageNet ResNet-101 encoder whose
    2048-channel feature map is pooled to 14 x 14, and a soft-attention LSTM decoder with embedding,
    attention and decoder sizes of 512 and dropout 0.5, trained with the doubly-stochastic attention
    penalty of weight 1.

    Args:
        encoder_config (`ResNetConfig` or `dict`, *optional*):
            The ResNet that encodes the image. Defaults to ResNet-101 (bottleneck blocks, depths 3-4-23-3,
            hidden sizes 256-512-1024-2048).
        encoded_image_size (`int`, *optional*, defaults to 14):
            Side of the square grid the feature map is adaptively pooled to; the decoder attends over
            `encoded_image_size ** 2` positions.
        vocab_size (`int`, *optional*, defaults to 10004):
            Size of the word map, special tokens included.
        embed_dim (`int`, *optional*, defaults to 512): Size of the word embeddings.
        attention_dim (`int`, *optional*, defaults to 512): Size of the attention network's hidden layer.
        decoder_dim (`int`, *optional*, defaults to 512): Size of the LSTM state.
        dropout (`float`, *optional*, defaults to 0.5): Dropout before the output layer.
        alpha_c (`float`, *optional*, defaults to 1.0):
            Weight of the doubly-stochastic regularisation `((1 - sum_t alpha_t) ** 2).mean()`, which pushes
            the model to attend to every part of the image over the whole caption.
        init_std (`float`, *optional*, defaults to 0.1):
            Half-width of the uniform initialisation of the embedding and output layers.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether decoding reuses the LSTM state and projected image features between steps.
    """

    model_type = "show_attend_tell"
    sub_configs = {"encoder_config": ResNetConfig}

    def __init__(
        self,
        encoder_config: ResNetConfig | dict[str, Any] | None = None,
        encoded_image_size: int = 14,
        vocab_size: int = 10004,
        embed_dim: int = 512,
        attention_dim: int = 512,
        decoder_dim: int = 512,
        dropout: float = 0.5,
        alpha_c: float = 1.0,
        init_std: float = 0.1,
        use_cache: bool = True,
        pad_token_id: int = PAD_TOKEN_ID,
        bos_token_id: int = START_TOKEN_ID,
        eos_token_id: int = END_TOKEN_ID,
        unk_token_id: int = UNK_TOKEN_ID,
        decoder_start_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if encoder_config is None:
            encoder_config = ResNetConfig(**copy.deepcopy(RESNET101))  # lists of its own
        elif isinstance(encoder_config, dict):
            encoder_config = {key: value for key, value in encoder_config.items() if key != "model_type"}
            encoder_config = ResNetConfig(**encoder_config)
        if pad_token_id == eos_token_id:
            # generate() pads finished beams with eos when the pad id is falsy; equal ids would make
            # padding indistinguishable from a real end of caption.
            raise ValueError("pad_token_id and eos_token_id must differ")
        self.encoder_config = encoder_config
        self.encoded_image_size = encoded_image_size
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.attention_dim = attention_dim
        self.decoder_dim = decoder_dim
        self.dropout = dropout
        self.alpha_c = alpha_c
        self.init_std = init_std
        self.use_cache = use_cache
        self.unk_token_id = unk_token_id
        kwargs.setdefault("is_encoder_decoder", True)
        # Without this, transformers 4.x ties the output layer to the embedding whenever their shapes match.
        kwargs["tie_word_embeddings"] = False
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=bos_token_id if decoder_start_token_id is None else decoder_start_token_id,
            **kwargs,
        )

    @property
    def encoder_dim(self) -> int:
        """Number of channels of the encoder's feature map (2048 for ResNet-101)."""
        return self.encoder_config.hidden_sizes[-1]

    @property
    def num_pixels(self) -> int:
        """Number of positions the decoder attends over."""
        return self.encoded_image_size**2

    @classmethod
    def tiny(cls, vocab_size: int = 32, **kwargs: Any) -> ShowAttendTellConfig:
        """A configuration small enough for unit tests: one block per stage, a few channels."""
        encoder_config = ResNetConfig(
            depths=[1, 1, 1, 1],
            hidden_sizes=[8, 16, 16, 32],
            embedding_size=8,
            layer_type="bottleneck",
        )
        defaults: dict[str, Any] = {
            "encoder_config": encoder_config,
            "encoded_image_size": 4,
            "vocab_size": vocab_size,
            "embed_dim": 16,
            "attention_dim": 16,
            "decoder_dim": 24,
            "dropout": 0.0,
        }
        defaults.update(kwargs)
        return cls(**defaults)


__all__ = ["ShowAttendTellConfig"]
