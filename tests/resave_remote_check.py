"""Run as a script: re-saves a model folder from its own code, as a user without this package would.

Usage: python resave_remote_check.py MODEL_DIR NEW_DIR IMAGE OUTPUT_JSON

Blocks `import show_attend_tell` first, so the classes come from MODEL_DIR's code files. Loads the model
and the processor with `trust_remote_code=True` (not the pipeline: its code is not loaded before the save),
saves both to NEW_DIR, then builds `pipeline("image-to-text")` from NEW_DIR and from MODEL_DIR and
captions IMAGE with each.
"""

import json
import os
import sys
import threading
from pathlib import Path

sys.modules["show_attend_tell"] = None  # any import of the package now raises ImportError

watchdog = threading.Timer(240, lambda: os._exit(3))  # never outlive a hung test
watchdog.daemon = True
watchdog.start()

import transformers  # noqa: E402
from transformers import AutoModel, AutoProcessor, pipeline  # noqa: E402

model_dir, new_dir, image, output_path = sys.argv[1:5]

model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
model.save_pretrained(new_dir)
processor.save_pretrained(new_dir)
result = {
    "transformers": transformers.__version__,
    "files": sorted(os.listdir(new_dir)),
    "custom_pipelines": json.loads(Path(new_dir, "config.json").read_text()).get("custom_pipelines"),
}
for name, folder in (("resaved", new_dir), ("original", model_dir)):
    try:
        captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
        result[name] = {
            "pipeline_class": type(captioner).__name__,
            "captions": [
                captioner(image, num_beams=beams, max_new_tokens=12)[0]["generated_text"]
                for beams in (1, 3, 5)
            ],
            "attention_words": len(captioner(image, num_beams=3, return_attention=True)[0]["words"]),
        }
    except Exception as error:  # reported to the test, which shows it
        result[name] = {"error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}
with open(output_path, "w") as file:
    json.dump(result, file)
