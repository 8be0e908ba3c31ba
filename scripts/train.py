#!/usr/bin/env python
"""Train Show, Attend and Tell with Accelerate.

    python scripts/train.py --dataset flickr30k --output-dir runs/flickr30k      # the specification's run
    accelerate launch scripts/train.py --dataset flickr30k --output-dir runs/f30k  # several GPUs/processes
    python scripts/train.py --dataset synthetic --model-size small --fine-tune-encoder --fine-tune-stages all \
        --output-dir runs/shapes                                                  # a small model on the CPU

This file is the command line. The options and their checks are in `show_attend_tell/training/options.py`,
the training loop in `show_attend_tell/training/loop.py` (read top to bottom; from Python:
`train(args)` with `args` from `build_parser()` and `check_args`). Accelerate picks the device (a GPU when
there is one) and runs the same code on one or many processes. `--dataset` defaults to `flickr30k`, like
scripts/evaluate_captions.py.

Batches. `--batch-size` counts captions per process and forward pass. A batch holds
`batch_size // captions_per_image` images and `--captions-per-image` (default 5) captions of each: with the
defaults, 12 images x 5 captions = 60 captions. Each image goes through the encoder once per batch and all
its captions attend over the same features. An epoch visits every image once, so with 5 captions per
image it sees every caption of Flickr30K once, like the specification's epoch. The effective batch is
`captions x processes x --gradient-accumulation-steps`.

Output folder (`--output-dir`):
    model/            the complete model folder (best validation BLEU-4; the last weights without validation)
                      that `AutoModel.from_pretrained(..., trust_remote_code=True)` and `pipeline` load
    checkpoints/      `checkpoint-<step>/`: `accelerator.save_state` (safetensors) + training_state.json
    logs/             TensorBoard (loss, lr, top-5 accuracy, validation BLEU-4)
    metrics.json, training_args.json
    feature_cache/    with --cache-features

Resuming. `--resume-from-checkpoint latest|DIR` restores the weights, the optimizer and where training
stood, down to the batch within the epoch. Batch order and caption choice depend only on
(seed, epoch, position), and the random generator that drives dropout is re-seeded from
(seed, epoch, batch, process) before every batch, so a run that is interrupted and resumed ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import sys

from show_attend_tell.training import TRAINING_ERRORS, UsageError, build_parser, check_args, train


def main(argv: list[str] | None = None) -> int:
    """Parses and checks the command line, trains; 2 for a bad command line, 1 when training fails."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        train(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TRAINING_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
