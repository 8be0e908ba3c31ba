"""Training Show, Attend and Tell: `train(args)` with `args` from `build_parser()` checked by `check_args`
(what `scripts/train.py` and `scripts/demo.py` call).

- `loop`: the training loop, read top to bottom: `train`, the run's one object `TrainingRun`, its steps.
- `options`: the command line's options and their checks.
- `data`: rows -> batches of B images x k captions (each image encoded once), row checks, bad rows.
- `feature_cache`: frozen-encoder features on disk (float16, native grid) for the epochs after the first.
- `checkpoint`: atomic checkpoint folders, `latest`, pruning.
- `evaluation`: captioning pictures in batches with `generate()`, attention localisation.
- `model_sizes`: the `full`, `small` and `tiny` configurations.
"""

from ..atomic_files import write_text_atomic  # re-exported: train.py writes its metrics with it
from .checkpoint import (
    CheckpointError,
    is_checkpoint,
    list_checkpoints,
    read_training_state,
    remove_stale_temporaries,
    resolve_checkpoint,
    write_checkpoint,
)
from .data import (
    CaptionBatchCollator,
    CaptionTrainingDataset,
    DataError,
    EpochBatchSampler,
    RowCheck,
    check_training_rows,
    mix_seed,
    usable_captions,
)
from .evaluation import GeneratedCaptions, Localisation, attention_localisation, generate_captions
from .feature_cache import FeatureCache, FrozenEncoderFeatures, feature_cache_key
from .loop import TRAINING_ERRORS, TrainingError, TrainingRun, train
from .model_sizes import MODEL_SIZES, ModelSize, build_model_config, model_size
from .options import UsageError, build_parser, check_args

__all__ = [
    "MODEL_SIZES",
    "TRAINING_ERRORS",
    "CaptionBatchCollator",
    "CaptionTrainingDataset",
    "CheckpointError",
    "DataError",
    "EpochBatchSampler",
    "FeatureCache",
    "FrozenEncoderFeatures",
    "GeneratedCaptions",
    "Localisation",
    "ModelSize",
    "RowCheck",
    "TrainingError",
    "TrainingRun",
    "UsageError",
    "attention_localisation",
    "build_model_config",
    "build_parser",
    "check_args",
    "check_training_rows",
    "feature_cache_key",
    "generate_captions",
    "is_checkpoint",
    "list_checkpoints",
    "mix_seed",
    "model_size",
    "read_training_state",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "train",
    "usable_captions",
    "write_checkpoint",
    "write_text_atomic",
]
