"""Caption datasets: Flickr30K (hub, Karpathy JSON, local files), image folders and synthetic shapes.

Every loader returns a ``datasets.DatasetDict`` with the splits ``train`` / ``validation`` /
``test`` and the columns ``image`` (``datasets.Image``), ``captions`` (list of strings) and
``image_id`` (string); see :func:`load_caption_dataset`.
"""

from .common import CAPTION_FEATURES, SPLIT_ALIASES, SPLITS, canonical_split, select_splits
from .flickr30k import (
    FLICKR30K_KARPATHY_SPLIT_SIZES,
    FLICKR30K_REPO_ID,
    FLICKR30K_REVISION,
    DatasetDownloadError,
    flickr30k_to_caption_dataset,
    hub_download_command,
    load_flickr30k,
)
from .karpathy import load_karpathy_json
from .loading import (
    DATASET_OPTION_HELP,
    NAMED_SOURCES,
    add_dataset_option_argument,
    load_caption_dataset,
    parse_dataset_options,
)
from .local import load_image_folder_captions, load_parquet_captions, write_parquet
from .synthetic import (
    COLOR_RGB,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    SYNTHETIC_DEFAULT_IMAGE_SIZE,
    SYNTHETIC_DEFAULT_SIZES,
    SYNTHETIC_FEATURES,
    SYNTHETIC_VERSION,
    make_synthetic_dataset,
)

__all__ = [
    "CAPTION_FEATURES",
    "COLORS",
    "COLOR_RGB",
    "DATASET_OPTION_HELP",
    "FLICKR30K_KARPATHY_SPLIT_SIZES",
    "FLICKR30K_REPO_ID",
    "FLICKR30K_REVISION",
    "NAMED_SOURCES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SPLIT_ALIASES",
    "SYNTHETIC_DEFAULT_IMAGE_SIZE",
    "SYNTHETIC_DEFAULT_SIZES",
    "SYNTHETIC_FEATURES",
    "SYNTHETIC_VERSION",
    "DatasetDownloadError",
    "add_dataset_option_argument",
    "canonical_split",
    "flickr30k_to_caption_dataset",
    "hub_download_command",
    "load_caption_dataset",
    "load_flickr30k",
    "load_image_folder_captions",
    "load_karpathy_json",
    "load_parquet_captions",
    "make_synthetic_dataset",
    "parse_dataset_options",
    "select_splits",
    "write_parquet",
]
