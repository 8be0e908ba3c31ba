"""Run as a script: loads a saved model folder the way a Hub user would, without this package.

Usage: python remote_load_check.py MODEL_DIR IMAGE_PATH OUTPUT_JSON
Blocks `import show_attend_tell` first, so everything must come from the folder's code files.
"""

import json
import sys

sys.modules["show_attend_tell"] = None  # any import of the package now raises ImportError

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
)

model_dir, image_path, output_path = sys.argv[1:4]
try:
    import show_attend_tell  # noqa: F401
except ImportError:
    package_importable = False
else:
    package_importable = True

config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)

image = Image.open(image_path)
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    greedy = model.generate(**inputs, num_beams=1, max_new_tokens=8)
    beam = model.generate(**inputs, num_beams=3, max_new_tokens=8)
result = {
    "package_importable": package_importable,
    "config_class": type(config).__name__,
    "model_class": type(model).__name__,
    "model_module": type(model).__module__,
    "tokenizer_class": type(tokenizer).__name__,
    "image_processor_class": type(image_processor).__name__,
    "processor_class": type(processor).__name__,
    "pixel_values": inputs["pixel_values"].flatten()[:50].tolist(),
    "greedy_ids": greedy.tolist(),
    "beam_ids": beam.tolist(),
    "caption": processor.batch_decode(beam)[0],
    "vocab": tokenizer.get_vocab(),
}
with open(output_path, "w") as file:
    json.dump(result, file)
