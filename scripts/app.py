#!/usr/bin/env python
"""A web demo of a trained captioning model (Gradio; from a clone: `pip install -e ".[app]"`).

    python scripts/app.py --model MODEL                          # http://127.0.0.1:7860
    python scripts/app.py --model MODEL --examples photos/ --port 8080

Two tabs:

* Caption: upload a picture (or click an example), choose the beam size and the longest caption, and get
  the caption with the attention figure (where the model looked for each word).
* Search: type a sentence and see the example pictures that the model finds it describes best, with the
  attention of each word over each of them (text-to-image retrieval, `show_attend_tell.retrieval`).
  The examples are encoded once at start-up (and cached on disk), so a search only runs the decoder.
  With `--index PATH` (a caption index made by `scripts/search_images.py build`) the search covers the
  indexed collection instead: the index proposes candidates and the model re-ranks them.

The same file works as a Hugging Face Space's `app.py`: put the model folder next to it as `model/` and
example pictures in `examples/`; the defaults pick them up (`--host 0.0.0.0` there, or GRADIO_SERVER_NAME).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Before gradio is imported: no usage statistics sent, and no phoning home from a machine that may be offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PROG = "app.py"
HERE = Path(__file__).resolve().parent
MAX_BEAMS = 10
MAX_WORDS = 50

DESCRIPTION = """\
**Show, Attend and Tell** (Xu et al., 2015): a ResNet encoder and an LSTM decoder with soft attention.
Each word of the caption comes with the part of the picture the model looked at while writing it
(bright = attended)."""

SEARCH_DESCRIPTION = """\
Text to images: every example picture is scored by how likely the model finds your sentence as its
caption (the average log-probability per word), and the best ones are shown with the attention of
each of your words over them."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Web demo: caption pictures and search them by text."
    )
    parser.add_argument(
        "--model", type=Path, default=HERE / "model", help="model folder (default: model/ next to this file)"
    )
    parser.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="folder of example pictures, also the gallery of the search tab (default: examples/ next to this "
        "file, if there is one)",
    )
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on"
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code files (*_show_attend_tell.py) instead of this package's classes: "
        "only for folders you trust (default: never)",
    )
    parser.add_argument("--cache-dir", type=Path, help="where the example pictures' features are cached")
    parser.add_argument(
        "--index",
        type=Path,
        help="search this caption index (scripts/search_images.py build) in the Search tab",
    )
    args = parser.parse_args(argv)
    if args.examples is None and (HERE / "examples").is_dir():
        args.examples = HERE / "examples"
    if args.examples is not None and not args.examples.is_dir():
        parser.error(f"--examples {args.examples}: not a folder")
    if not args.model.is_dir():
        parser.error(
            f"--model {args.model}: not a folder (train one with scripts/train.py or scripts/demo.py)"
        )
    return args


def figure_to_image(fig: Any) -> Any:
    """A matplotlib figure as a PIL image (what gr.Image shows), the figure released afterwards."""
    from PIL import Image

    from show_attend_tell.visualization import write_png

    buffer = io.BytesIO()
    write_png(fig, buffer)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def search_pictures(
    retriever: Any | None, query: str, top_k: int
) -> tuple[list[tuple[Any, str]], Any, str | None]:
    """
    What the Search tab shows for `query`: the pictures found (each with its label `#rank id (score)`), the
    figure of the query's attention over them and a warning for the page (why there are no pictures, or the
    words the model does not know). A `CaptionRetriever` searches the example pictures, an `IndexedRetriever`
    a caption index. Raises ValueError with the message for the page when there is nothing to search.
    """
    from show_attend_tell.retrieval import plot_search_results

    if retriever is None:
        raise ValueError("Nothing to search: start the app with --examples FOLDER or --index PATH.")
    if not query or not query.strip():
        raise ValueError("Type a sentence to search for.")
    result = retriever.search(query, top_k=top_k)
    # An index search brings its own gallery (the candidates it re-ranked); hit.index refers to it.
    searched = result.gallery or retriever.gallery
    pictures = [
        (searched.load(hit.index), f"#{hit.rank} {hit.image_id} ({hit.score:.2f})") for hit in result.hits
    ]
    warning = None
    if result.reason:
        warning = f"No pictures: {result.reason}."
    elif result.unknown_words:
        warning = f"Words the model does not know (scored as <unk>): {', '.join(result.unknown_words)}"
    return pictures, plot_search_results(result, searched), warning


def build_demo(captioner: Any, retriever: Any | None = None, examples: Sequence[Path] = ()) -> Any:
    """
    The Gradio interface around a `show_attend_tell.serve.Captioner` and, for the search tab, a
    `show_attend_tell.retrieval.CaptionRetriever` over the example pictures.
    """
    import gradio as gr

    with gr.Blocks(title="Show, Attend and Tell") as demo:
        gr.Markdown("# Show, Attend and Tell")
        with gr.Tab("Caption", id="caption-tab"):
            add_caption_tab(captioner, examples)
        with gr.Tab("Search", id="search-tab"):
            add_search_tab(retriever)
    return demo


# Both tabs' handlers first clear their outputs, then fill them or raise gr.Error: an error must not leave the
# previous picture's caption and figure on screen next to the new picture, as if they described it.


def add_caption_tab(captioner: Any, examples: Sequence[Path]) -> None:
    """The Caption tab's contents, added to the open `gr.Tab`: picture, beam size and length in, the caption
    and its attention figure out, and the example pictures to click."""
    import gradio as gr

    from show_attend_tell.image_processing_show_attend_tell import ImageLoadError, load_image
    from show_attend_tell.serve import CaptionOptions
    from show_attend_tell.visualization import plot_attention

    def caption(image: Any, num_beams: float, max_words: float) -> Iterator[tuple[str, Any]]:
        yield "", None
        if image is None:
            raise gr.Error("Upload a picture first (or click an example).")
        try:
            picture = load_image(image, name="the uploaded picture")
        except ImageLoadError as error:
            raise gr.Error(str(error)) from None
        options = CaptionOptions(int(num_beams), int(max_words) + 1, return_attention=True)  # +1: <end>
        (result,) = captioner.caption_batch([picture], options)
        text = result.caption or "(the model wrote an empty caption)"
        figure = plot_attention(picture, result.tokens, result.attention, columns=5, panel_size=2.0)
        yield text, figure_to_image(figure)

    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                type="pil",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="Picture",
                height=320,  # small pictures would otherwise show as a thumbnail strip
                elem_id="image",
            )
            beams = gr.Slider(
                1,
                MAX_BEAMS,
                value=captioner.default_num_beams,
                step=1,
                label="Beam size",
                elem_id="beams",
            )
            words = gr.Slider(
                1,
                MAX_WORDS,
                value=min(MAX_WORDS, max(1, captioner.default_max_new_tokens - 1)),
                step=1,
                label="Longest caption (words)",
            )
            button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        with gr.Column(scale=2):
            text = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
            figure = figure_view("Attention", "figure")
    gr.on([button.click, image.upload], caption, inputs=[image, beams, words], outputs=[text, figure])
    if examples:
        gr.Examples(
            examples=[[str(path)] for path in examples],
            inputs=[image],
            label="Examples (click one, then Caption)",
            examples_per_page=12,
        )


def add_search_tab(retriever: Any | None) -> None:
    """The Search tab's contents, added to the open `gr.Tab`: a sentence in, the pictures it describes best
    (`search_pictures`) and the attention of its words over them out."""
    import gradio as gr

    def search(query: str, top_k: float) -> Iterator[tuple[list[tuple[Any, str]], Any]]:
        yield [], None
        try:
            pictures, figure, warning = search_pictures(retriever, query, int(top_k))
        except ValueError as error:
            raise gr.Error(str(error)) from None
        if warning:
            gr.Warning(warning)
        yield pictures, figure_to_image(figure)

    gr.Markdown(SEARCH_DESCRIPTION)
    if retriever is None:
        gr.Markdown("*Start the app with `--examples FOLDER` to search those pictures.*")
    with gr.Row():
        query = gr.Textbox(label="Describe a picture", placeholder="a small red circle", elem_id="query")
        top_k = gr.Slider(1, 12, value=4, step=1, label="Pictures to show")
    search_button = gr.Button("Search", variant="primary", elem_id="search-button")
    hits = gr.Gallery(label="Best matches", columns=6, height="auto", object_fit="contain", elem_id="hits")
    search_figure = figure_view("Attention of each word", "search-figure")
    gr.on(
        [search_button.click, query.submit],
        search,
        inputs=[query, top_k],
        outputs=[hits, search_figure],
    )


def figure_view(label: str, elem_id: str) -> Any:
    """Where an attention figure is shown (read-only, PNG), in the open layout block."""
    import gradio as gr

    # No label badge: it would cover the figure's own caption in its top left corner.
    return gr.Image(
        type="pil", format="png", label=label, show_label=False, interactive=False, elem_id=elem_id
    )


def make_theme() -> Any:
    """Gradio's Soft theme with system fonts: the default fetches Google Fonts, unreachable offline."""
    import gradio as gr

    return gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def make_retriever(
    captioner: Any, examples: Path | None, index: Path | None, cache_dir: Path | None = None
) -> tuple[Any | None, list[Path]]:
    """
    What the Search tab searches, and the example pictures to offer: the readable pictures of the `examples`
    folder (a `CaptionRetriever` over them), or with `index` the caption index (an `IndexedRetriever`, which
    takes the examples' cached features for those of its pictures that are examples). None when there is
    nothing to search. Raises `CaptionIndexError` (one line) for a missing, damaged or foreign index.
    """
    from show_attend_tell.image_processing_show_attend_tell import image_files
    from show_attend_tell.retrieval import CaptionRetriever, ImageGallery, IndexedRetriever

    retriever = None
    pictures: list[Path] = []
    if examples is not None:
        pictures = image_files(examples)
        try:
            retriever = CaptionRetriever(
                captioner.model, captioner.processor, ImageGallery.from_folder(examples), cache_dir=cache_dir
            )
        except ValueError as error:  # no readable picture in the folder: caption still works
            print(f"{PROG}: warning: search disabled: {error}", file=sys.stderr)
        else:
            # Only the pictures that could be read are offered as examples.
            readable = {examples / image_id for image_id in retriever.features.ids}
            pictures = [path for path in pictures if path in readable]
    if index is not None:
        retriever = IndexedRetriever(
            captioner.model,
            captioner.processor,
            index,
            gallery=retriever.gallery if retriever is not None else None,
            features=retriever.features if retriever is not None else None,
        )
    return retriever, pictures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401 - only to say what to install
    except ImportError:
        print(f"{PROG}: error: the web demo needs Gradio: pip install gradio", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    from show_attend_tell.device import pick_device
    from show_attend_tell.errors import one_line
    from show_attend_tell.hub import UnsafeWeightsError
    from show_attend_tell.serve import Captioner

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.basicConfig(format=f"{PROG}: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        print(f"{PROG}: error: --device {error}", file=sys.stderr)
        return 2
    try:
        captioner = Captioner.from_pretrained(
            str(args.model), device=device, trust_remote_code=args.trust_remote_code
        )
    except (OSError, UnsafeWeightsError, ValueError) as error:
        print(f"{PROG}: error: cannot load the model: {one_line(error)}", file=sys.stderr)
        return 2

    from show_attend_tell.caption_index import CaptionIndexError

    try:
        retriever, examples = make_retriever(captioner, args.examples, args.index, args.cache_dir)
    except CaptionIndexError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    demo = build_demo(captioner, retriever, examples)
    print(f"{PROG}: serving on http://{args.host}:{args.port}", flush=True)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        theme=make_theme(),
        share=False,
        ssr_mode=False,  # no Node.js server: plain Python is enough for this page
        show_error=True,
        max_file_size="20mb",  # uploads above it are refused by Gradio before they reach the model
        allowed_paths=[str(args.examples.resolve())] if args.examples else None,
        footer_links=["api"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
