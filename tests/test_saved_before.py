"""A model folder saved by the code before the model file was rewritten (issue 18) still loads and decodes the
same: its weights' names are unchanged, and the ids were recorded when it was saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import unit_features
from transformers.modeling_outputs import BaseModelOutput

from show_attend_tell import ShowAttendTellForConditionalGeneration

pytestmark = pytest.mark.compat

FIXTURE = Path(__file__).parent / "fixtures" / "model_saved_before_issue_18"


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "plain-step"])
def test_a_folder_saved_before_the_rewrite_gives_the_ids_it_gave_then(fast):
    expected = json.loads((FIXTURE.parent / f"{FIXTURE.name}_ids.json").read_text())
    model = ShowAttendTellForConditionalGeneration.from_pretrained(FIXTURE).eval()
    model.decoder.fast_inference = fast
    features = unit_features(3, model.config, seed=11).last_hidden_state
    with torch.no_grad():
        for beams in (1, 3):
            ids = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=features.clone()),
                num_beams=beams,
                max_new_tokens=8,
            )
            assert ids.tolist() == expected[f"beam{beams}"]
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        ids = model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=8)
    assert ids.tolist() == expected["pixels_beam3"]
