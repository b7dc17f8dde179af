"""A Gradio app to try MAGMA in the browser: images, a prompt, few-shot examples, the answer streamed as generated.

Flat, and depending only on transformers, gradio and the folder's own modules, so that a saved model folder made a
Hugging Face Space (`magma-hf app MODEL_DIR --write-space`) runs it with `python app.py` where `magma_hf` is not
installed; `magma-hf app MODEL_DIR` runs the same app on the package's model classes.

Prompts follow MAGMA's layout (`prompts_magma.py`, the evaluation harness's): the few-shot examples first, each its
image, its text and a newline, then the query images (at the prompt's `<|image|>` placeholders, or in front of it)
and the prompt. An empty prompt with an image asks for a caption. Generation goes through the model's `generate` with
transformers' `TextIteratorStreamer`; its defaults are the model's generation config. The text shown once generation
ends is the processor's `post_process_image_text_to_text` of the generated ids, as the pipeline returns it.
"""

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .processing_magma import IMAGE_TOKEN
from .prompts_magma import few_shot_prompt, query_with_images

MAX_IMAGES = 8  # query and example images together: each costs num_image_tokens positions
DEFAULT_MAX_NEW_TOKENS = 32  # where the generation config sets no max_new_tokens
FOLDER_EXAMPLES = 8  # examples taken from a folder given as examples
EXAMPLES_FOLDER = "app_examples"  # images of a model folder (a Space) offered as the page's examples
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TITLE = "MAGMA: images and a prompt in, text out"


class InputError(ValueError):
    """Input the app cannot run, with a message for the page."""


@dataclass(frozen=True)
class Query:
    """What the model gets: the full prompt and its images in placeholder order (examples' first)."""

    prompt: str
    images: list[str]


@dataclass(frozen=True)
class Settings:
    """Generation settings from the page; `greedy` unless `do_sample`."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    def generate_kwargs(self) -> dict:
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "num_beams": 1,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }


def default_settings(generation_config) -> Settings:
    """The page's defaults: the model's generation config (a setting it leaves unset: transformers' default)."""
    config = generation_config
    return Settings(
        do_sample=bool(config.do_sample),
        temperature=float(config.temperature if config.temperature is not None else 1.0),
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        top_k=int(config.top_k or 0),
        max_new_tokens=int(config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
    )


def gallery_paths(gallery) -> list[str]:
    """File paths of a Gradio gallery's value (`[(path, caption), ...]`, or None when empty)."""
    return [item[0] if isinstance(item, (list, tuple)) else item for item in (gallery or [])]


def example_lines(text: str | None) -> list[str]:
    """One few-shot example text per non-empty line, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def build_query(
    images: Sequence[str],
    prompt: str,
    example_images: Sequence[str] = (),
    example_texts: Sequence[str] = (),
    max_images: int = MAX_IMAGES,
) -> Query:
    """The full prompt and its images, or an `InputError` that says what is wrong with the input."""
    prompt = prompt or ""
    if not images and not prompt.strip():
        raise InputError("Give an image (to caption it) or a prompt: both are empty.")
    if len(example_images) != len(example_texts):
        raise InputError(
            f"The few-shot examples have {len(example_images)} image{'s' * (len(example_images) != 1)} and "
            f"{len(example_texts)} text{'s' * (len(example_texts) != 1)}: give one text line per example image."
        )
    total = len(images) + len(example_images)
    if total > max_images:
        raise InputError(
            f"{total} images ({len(images)} for the prompt, {len(example_images)} in examples): this app takes at "
            f"most {max_images}."
        )
    if any(IMAGE_TOKEN in text for text in example_texts):
        raise InputError(f"A few-shot example's text holds {IMAGE_TOKEN}: each example has exactly its own image.")
    placeholders = prompt.count(IMAGE_TOKEN)
    if placeholders and placeholders < len(images):
        raise InputError(
            f"Too many images: {len(images)} images and {placeholders} {IMAGE_TOKEN} placeholder"
            f"{'s' * (placeholders != 1)} in the prompt. Add a {IMAGE_TOKEN} for each image, or remove them all to "
            "put the images in front."
        )
    try:
        query = query_with_images(prompt, len(images))
    except ValueError as error:
        raise InputError(str(error)) from error
    return Query(few_shot_prompt(list(example_texts), query), [*example_images, *images])


class StopOnEvent(StoppingCriteria):
    """Ends generation once `event` is set (the page's stop button, or the page going away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class MagmaApp:
    """The app's logic on a loaded model and processor, apart from the page: prompts, checks, streamed answers."""

    def __init__(self, model, processor, max_images: int = MAX_IMAGES):
        self.model = model.eval()
        self.processor = processor
        self.max_images = max_images
        self.defaults = default_settings(model.generation_config)
        self.n_positions = model.config.text_config.n_positions
        self._stops: dict[str, threading.Event] = {}  # session -> its running generation's stop
        self._stopped: set[str] = set()  # sessions whose generation the stop button ended

    def model_inputs(self, query: Query):
        """The processor's inputs on the model's device, or an `InputError` naming an image it cannot read."""
        try:
            inputs = self.processor(images=query.images or None, text=[query.prompt], return_tensors="pt")
        except (ValueError, OSError, TypeError) as error:
            raise InputError(f"Cannot use this input: {error}") from error
        return inputs.to(self.model.device)

    def new_token_budget(self, inputs, n_images: int, max_new_tokens: int) -> int:
        """`max_new_tokens`, cut to the room the prompt leaves in the model's `n_positions`; an `InputError` when the
        prompt leaves none."""
        if max_new_tokens < 1:
            raise InputError(f"max new tokens must be at least 1, got {max_new_tokens}")
        length = inputs["input_ids"].shape[1]
        if length >= self.n_positions:
            image_tokens = n_images * self.processor.num_image_tokens
            raise InputError(
                f"Text too long for the model: the prompt is {length} tokens ({image_tokens} of them for {n_images} "
                f"image{'s' * (n_images != 1)}), and the model takes at most {self.n_positions} (n_positions) with "
                "the answer. Shorten the prompt, or use fewer images or examples."
            )
        return min(max_new_tokens, self.n_positions - length)

    def prepare(self, query: Query, settings: Settings):
        """The model's inputs, and `settings` with max new tokens cut to what fits (`new_token_budget`)."""
        inputs = self.model_inputs(query)
        budget = self.new_token_budget(inputs, len(query.images), settings.max_new_tokens)
        return inputs, replace(settings, max_new_tokens=budget)

    def stream(self, query: Query, settings: Settings, stop: threading.Event | None = None) -> Iterator[str]:
        """The answer so far, once per piece the streamer gives; last, the processor's clean-up of all generated ids.

        Generation runs in a thread and ends early when `stop` is set or this generator is closed."""
        inputs, settings = self.prepare(query, settings)
        yield from self.stream_inputs(inputs, settings, stop)

    def stream_inputs(self, inputs, settings: Settings, stop: threading.Event | None = None) -> Iterator[str]:
        """`stream` on prepared inputs."""
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        stop = stop or threading.Event()
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate() -> None:
            try:
                with torch.no_grad():
                    result["ids"] = self.model.generate(
                        **inputs,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                        **settings.generate_kwargs(),
                    )
            except Exception as error:  # shown in the page by the caller
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, name="magma-generate", daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        finally:
            stop.set()  # a closed generator (the page cancelled) stops generating too
            worker.join()
        if "error" in result:
            raise InputError(f"Generation failed: {result['error']}") from result["error"]
        new_ids = result["ids"][:, inputs["input_ids"].shape[1] :]
        yield self.processor.post_process_image_text_to_text(new_ids)[0]

    def answer(
        self,
        images,
        prompt: str,
        example_images,
        example_texts: str,
        do_sample: bool,
        temperature: float,
        top_p: float,
        top_k: float,
        max_new_tokens: float,
        session: str = "",
    ) -> Iterator[tuple[str, str, str]]:
        """The page's handler: yields (answer so far, full prompt, message); bad input gives only a message."""
        started = time.perf_counter()
        stop = self._stops[session] = threading.Event()
        try:
            query = build_query(
                gallery_paths(images),
                prompt,
                gallery_paths(example_images),
                example_lines(example_texts),
                self.max_images,
            )
            settings = Settings(bool(do_sample), float(temperature), float(top_p), int(top_k), int(max_new_tokens))
            inputs, used = self.prepare(query, settings)
            note = ""
            if used.max_new_tokens < settings.max_new_tokens:
                note = (
                    f" Max new tokens cut to {used.max_new_tokens}: the prompt's {inputs['input_ids'].shape[1]} "
                    f"tokens leave no more of the model's {self.n_positions} positions (n_positions)."
                )
            text = ""
            for text in self.stream_inputs(inputs, used, stop):
                yield text, query.prompt, "Generating…"
        except InputError as error:
            yield "", "", f"**Cannot run this:** {error}"
            return
        except Exception as error:  # anything else is still said in the page, never as a stack trace
            yield "", "", f"**Cannot run this:** {type(error).__name__}: {error}"
            return
        finally:
            stopped = session in self._stopped
            self._stops.pop(session, None)
            self._stopped.discard(session)
        how = "Stopped" if stopped else "Done"
        yield text, query.prompt, f"{how} after {time.perf_counter() - started:.1f} s.{note}"

    def stop(self, session: str = "") -> None:
        """The stop button: ends the session's running generation (the text so far stays)."""
        event = self._stops.get(session)
        if event is not None:
            self._stopped.add(session)
            event.set()

    def page(self, examples: Sequence[str] = ()):
        """The Gradio page (`gr.Blocks`) on this app; `examples`: image paths offered as examples."""
        gr = require_gradio()
        defaults = self.defaults
        with gr.Blocks(title="MAGMA") as page:
            gr.Markdown(
                f"## {TITLE}\n"
                f"Drop or paste one or more images, and type a prompt (empty: a caption). Several images go where the "
                f"prompt's `{IMAGE_TOKEN}` placeholders are (none: in front). Few-shot examples (an image and a text "
                "each) come before the query, one text line per example image."
            )
            with gr.Row():
                with gr.Column():
                    images = image_gallery(gr, "Images", height=220, elem_id="magma-images")
                    prompt = gr.Textbox(
                        label=f"Prompt (empty: a caption; {IMAGE_TOKEN} places an image)",
                        placeholder="Q: What is in the picture? A:",
                        lines=2,
                        elem_id="magma-prompt",
                    )
                    with gr.Accordion("Few-shot examples", open=False):
                        example_images = image_gallery(gr, "Example images", height=160, elem_id="magma-example-images")
                        example_texts = gr.Textbox(
                            label="Example texts, one line per example image (e.g. a caption, or Q: ... A: ...)",
                            lines=3,
                            elem_id="magma-example-texts",
                        )
                    with gr.Accordion("Generation settings (defaults: the model's generation config)", open=False):
                        do_sample = gr.Checkbox(
                            value=defaults.do_sample, label="Sample (off: greedy)", elem_id="magma-sample"
                        )
                        temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label="temperature")
                        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top-p")
                        top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="top-k (0: off)")
                        max_new_tokens = gr.Slider(
                            1, max(self.n_positions, defaults.max_new_tokens), value=defaults.max_new_tokens, step=1,
                            label="max new tokens", elem_id="magma-max-new-tokens",
                        )  # fmt: skip
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="magma-run")
                        stop = gr.Button("Stop", variant="stop", elem_id="magma-stop")
                with gr.Column():
                    answer = gr.Textbox(label="Answer", lines=6, interactive=False, elem_id="magma-answer")
                    message = gr.Markdown(elem_id="magma-message")
                    with gr.Accordion("The prompt the model got", open=False):
                        full_prompt = gr.Textbox(
                            show_label=False, lines=3, interactive=False, elem_id="magma-full-prompt"
                        )
            if examples:
                gr.Examples([[[p]] for p in examples], inputs=[images], label="Examples", elem_id="magma-examples")

            # Gradio passes the request to a parameter annotated gr.Request (the session, for the stop button).
            def on_run(images, prompt, example_images, example_texts, do_sample, temperature, top_p, top_k,
                       max_new_tokens, request: gr.Request):  # fmt: skip
                values = (images, prompt, example_images, example_texts, do_sample, temperature, top_p, top_k)
                yield from self.answer(*values, max_new_tokens, session=session_id(request))

            def on_stop(request: gr.Request):
                self.stop(session_id(request))

            inputs = [images, prompt, example_images, example_texts, do_sample, temperature, top_p, top_k]
            inputs.append(max_new_tokens)
            outputs = [answer, full_prompt, message]
            # one generation at a time on the one model, whichever way it was started
            run.click(on_run, inputs, outputs, concurrency_limit=1, concurrency_id="magma-generate")
            prompt.submit(on_run, inputs, outputs, concurrency_limit=1, concurrency_id="magma-generate")
            # the event ends generation at the next token, and the run reports that it stopped (no Gradio cancel,
            # which would end the run before it says so)
            stop.click(on_stop, None, None, queue=False)
        return page


def image_gallery(gr, label: str, height: int, elem_id: str):
    """An image input of the page: files uploaded or pasted, shown four to a row (the query's and the examples')."""
    return gr.Gallery(
        label=label,
        type="filepath",
        interactive=True,
        sources=["upload", "clipboard"],
        file_types=["image"],
        columns=4,
        height=height,
        object_fit="contain",
        fit_columns=False,
        elem_id=elem_id,
    )


def session_id(request) -> str:
    """The browser session a request comes from (Gradio's session hash)."""
    return getattr(request, "session_hash", None) or ""


def require_gradio():
    """Gradio, imported only to serve the page: importing this module (the Space writer, `magma-hf demo`) and loading
    the model folder do not need it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError("The MAGMA app needs Gradio: pip install 'gradio>=5' (or 'magma-hf[app]')") from error
    return gradio


def example_images_in(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files among `paths`, each a file or a folder (its first `FOLDER_EXAMPLES` images, sorted, searched
    recursively: a data set's folder gives a few examples, not thousands)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += [str(p) for p in images[:FOLDER_EXAMPLES]]
        elif path.is_file():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"Example image {str(path)!r} does not exist")
    return found


def launch(
    model,
    processor,
    host: str | None = None,
    port: int | None = None,
    examples: Sequence[str] = (),
    max_images: int = MAX_IMAGES,
    **launch_kwargs,
):
    """Serve the app on `model` and `processor` (blocks until stopped unless `prevent_thread_lock=True`).

    `host` and `port` left None: Gradio's defaults and environment (`GRADIO_SERVER_NAME`, `GRADIO_SERVER_PORT`, which
    Spaces set)."""
    page = MagmaApp(model, processor, max_images).page(examples)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, **launch_kwargs)
    return page


def load_folder(model_dir: str | os.PathLike, device: str | None = None):
    """The model and processor of a saved folder from its own code (`trust_remote_code=True`), as a Space loads them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).to(device)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def main(model_dir: str | os.PathLike = ".") -> None:
    """A Space's entry point (`python app.py` in the model folder): the app on the folder's model and examples."""
    require_gradio()
    model, processor = load_folder(model_dir)
    examples_folder = Path(model_dir) / EXAMPLES_FOLDER
    launch(model, processor, examples=example_images_in([examples_folder]) if examples_folder.is_dir() else ())


__all__ = ["InputError", "MagmaApp", "Query", "Settings", "build_query", "launch", "load_folder", "main"]
