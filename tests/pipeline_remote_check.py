"""Run as a script: uses `pipeline("image-to-text")` on a saved folder the way a Hub user would.

Usage: python pipeline_remote_check.py MODEL_DIR IMAGE_DIR OUTPUT_JSON

Blocks `import show_attend_tell` first, so the pipeline class and the model must come from the folder's
code files. Serves IMAGE_DIR on 127.0.0.1 (a free port, a thread that stops when the script ends, and a
watchdog that ends the process if anything hangs) to test URL inputs without the network.
"""

import functools
import http.server
import json
import os
import sys
import threading

sys.modules["show_attend_tell"] = None  # any import of the package now raises ImportError

WATCHDOG_SECONDS = 240
watchdog = threading.Timer(WATCHDOG_SECONDS, lambda: os._exit(3))  # never outlive a hung test
watchdog.daemon = True
watchdog.start()

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import pipeline  # noqa: E402

model_dir, image_dir, output_path = sys.argv[1:4]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test's stderr for real errors
        pass


server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(QuietHandler, directory=image_dir)
)
server.timeout = 5
threading.Thread(target=server.serve_forever, daemon=True).start()
base_url = f"http://127.0.0.1:{server.server_address[1]}"

try:
    captioner = pipeline("image-to-text", model=model_dir, trust_remote_code=True)
    path_a = os.path.join(image_dir, "a.png")
    path_b = os.path.join(image_dir, "b.jpg")

    def texts(outputs):
        return [[record["generated_text"] for record in per_image] for per_image in outputs]

    result = {
        "transformers": transformers.__version__,
        "pipeline_class": type(captioner).__name__,
        "pipeline_module": type(captioner).__module__,
        "model_module": type(captioner.model).__module__,
        "path": captioner(path_a, max_new_tokens=6),
        "url": captioner(f"{base_url}/a.png", max_new_tokens=6),
        "pil": captioner(Image.open(path_b), max_new_tokens=6),
        "list_batched": texts(
            captioner([path_a, f"{base_url}/b.jpg", Image.open(path_a)], batch_size=2, max_new_tokens=6)
        ),
        "beams": texts(
            captioner(
                [path_a, path_b],
                batch_size=2,
                generate_kwargs={"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 6},
            )
        ),
    }
    with_attention = captioner(
        path_a, return_attention=True, generate_kwargs={"num_beams": 2, "max_new_tokens": 6}
    )
    result["attention"] = {
        "text": with_attention[0]["generated_text"],
        "words": with_attention[0]["words"],
        "shape": list(with_attention[0]["attention"].shape),
        "row_sums": with_attention[0]["attention"].sum(axis=1).tolist(),
    }
    errors = {}
    for name, source in [
        ("missing_url", f"{base_url}/missing.png"),
        ("bad_file", os.path.join(image_dir, "bad.jpg")),
    ]:
        try:
            captioner(source)
        except ValueError as error:
            errors[name] = str(error)
    result["errors"] = errors
finally:
    server.shutdown()
    server.server_close()

with open(output_path, "w") as file:
    json.dump(result, file)
watchdog.cancel()
