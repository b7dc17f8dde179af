"""MAGMA's processor: CLIP image preprocessing plus the GPT-2 tokenizer with `<|image|>`."""

import os
from collections.abc import Callable

from transformers import ProcessorMixin
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import MultiModalData, ProcessingKwargs

from .hub_magma import PROCESSOR_FILES_JSON, auto_map_left_unchanged, check_json_files, check_processor_files

IMAGE_TOKEN = "<|image|>"
FEATURE_STRIDE = 32  # the ResNet's total downsampling: one image token per 32x32 pixels of the crop
# MAGMA has no chat format. This template writes a conversation as MAGMA reads a prompt: each message's images first
# (one <|image|> per image part, in order), then its text parts; system, user and assistant messages alike, one after
# the other with nothing between them and no role marked; a generation prompt adds nothing. Every folder the
# processor saves carries it (chat_template.jinja), so `apply_chat_template` and vLLM's chat endpoint use it.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] in ['image', 'image_url'] -%}" + IMAGE_TOKEN + "{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def add_magma_special_tokens(tokenizer):
    """Make a GPT-2 style tokenizer MAGMA's, in place: `<|image|>` added as the special cls token when absent (as
    the original did: id 50257 for GPT-2) and end-of-text as the padding token. Returns the tokenizer."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"cls_token": IMAGE_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # MAGMA pads with <|endoftext|>
    return tokenizer


def check_processor_matches_model(processor, config, where: str = "") -> None:
    """A processor and a model config that do not fit together fail late and obscurely ("0 image tokens", an
    embedding IndexError, a wrong token count); call this wherever the two are paired. Raises a `ValueError` naming
    both values of each disagreement: the `<|image|>` id, the tokenizer's size against the vocabulary, and the image
    size (which sets the image token count).

    Args:
        where: Where they came from (e.g. a folder), for the message.
    """
    problems = []
    if processor.image_token_id != config.image_token_id:
        problems.append(
            f"the tokenizer maps {IMAGE_TOKEN} to id {processor.image_token_id}, the model's config.image_token_id "
            f"is {config.image_token_id}"
        )
    vocab_size = config.text_config.vocab_size
    if len(processor.tokenizer) > vocab_size:
        problems.append(
            f"the tokenizer has {len(processor.tokenizer)} tokens, more than the model's vocabulary "
            f"(text_config.vocab_size {vocab_size})"
        )
    crop = processor.image_processor.crop_size
    image_size = config.vision_config.image_size
    if (crop["height"], crop["width"]) != (image_size, image_size):
        problems.append(
            f"the image processor crops to {crop['height']}x{crop['width']}, the model takes "
            f"{image_size}x{image_size} (vision_config.image_size)"
        )
    if problems:
        raise ValueError(
            f"The processor does not match the model{f' in {where}' if where else ''}: {'; '.join(problems)}. Use "
            "the processor saved with the model (MagmaProcessor.from_pretrained of the model's folder)."
        )


def place_images_in_front(text: str, count: int) -> str:
    """MAGMA's layout for a text without `<|image|>` placeholders: its `count` images come first (a text with
    placeholders is returned as it is)."""
    return text if IMAGE_TOKEN in text else IMAGE_TOKEN * count + text


def load_images_naming_the_source(images, load: Callable):
    """`load` applied to each image of `images` (one, a list, or a list of lists), but an image given as a string (a
    URL, path or base64 data) that cannot be read is named: transformers' `load_image` says "Connection refused"
    without the URL, and "Incorrect padding" for a missing file."""
    if isinstance(images, (list, tuple)):
        return [load_images_naming_the_source(image, load) for image in images]
    try:
        return load(images)
    except Exception as error:
        if not isinstance(images, str):
            raise
        raise ValueError(f"The image {images[:200]!r} {image_source_problem(images, error)}") from error


def image_source_problem(source: str, error: Exception) -> str:
    """What went wrong with an image given as a URL, a file or base64 data, as far as can be told offline."""
    if source.startswith(("http://", "https://")):
        offline = " (HF_HUB_OFFLINE is set: pass a local file when offline)" if os.environ.get("HF_HUB_OFFLINE") else ""
        return f"could not be fetched as an image{offline}: {error}"
    if source.startswith("data:image/"):
        return f"is not valid base64 image data: {error}"
    if os.path.exists(source):
        return f"is not an image file PIL can read: {error}"
    where = "" if os.path.isabs(source) else f" in {os.getcwd()}"
    return f"is not a file{where} (nor a URL or base64 image data)"


class MagmaProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False}}


class MagmaProcessor(ProcessorMixin):
    """Turns images and text into MAGMA's inputs.

    - Each `<|image|>` in the text stands for one image, in order, and is expanded to the image's
      `(crop_size / 32) ** 2` image tokens (144 at 384 px).
    - A text without `<|image|>` gets its images in front, MAGMA's own layout; with `text=None` every image (or every
      list of images) becomes a caption prompt of its own. Texts and images whose counts do not match are refused,
      naming both counts.
    - Batches are padded on the left, ready for `generate`; truncation that would cut into an image's tokens is an
      error, never a silent cut.
    - `decode` and `batch_decode` are the tokenizer's; `post_process_image_text_to_text` is MAGMA's clean-up of
      generated ids (image tokens dropped, cut at the first end-of-text).

    Args:
        image_processor ([`MagmaImageProcessor`]): CLIP preprocessing at the model's image size.
        tokenizer: GPT-2's tokenizer with the special token `<|image|>` (MAGMA used it as the cls token).
        chat_template: Defaults to `DEFAULT_CHAT_TEMPLATE`, MAGMA's layout (images first, then the text).
    """

    valid_processor_kwargs = MagmaProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if tokenizer is None or image_processor is None:
            raise ValueError("MagmaProcessor needs both an image_processor and a tokenizer")
        self.image_token = IMAGE_TOKEN
        self.image_token_id = self.require_image_token(tokenizer)
        tokenizer.padding_side = "left"  # generation continues at the right end of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # MAGMA pads with <|endoftext|>
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if os.path.isdir(folder):  # a truncated tokenizer.json is otherwise a bare JSONDecodeError
            check_processor_files(folder)  # and a missing one advice to install sentencepiece
            check_json_files(folder, PROCESSOR_FILES_JSON)
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # `auto_map` belongs to the saved files (`auto_map_left_unchanged`): the tokenizer loads it into `init_kwargs`.
        for holder in processor._auto_map_holders():
            holder.pop("auto_map", None)
        return processor

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' saving, which writes `auto_map` into the saved files by setting it on the live processor,
        its image processor and its tokenizer: here they are put back as they were, so saving changes nothing."""
        with auto_map_left_unchanged(*self._auto_map_holders()):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _auto_map_holders(self) -> list[dict]:
        """Where saving records `auto_map`: the processor's and image processor's attributes, the tokenizer's
        `init_kwargs`."""
        return [vars(self), vars(self.image_processor), self.tokenizer.init_kwargs]

    @staticmethod
    def require_image_token(tokenizer) -> int:
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id is None or token_id == tokenizer.unk_token_id or IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}, {len(tokenizer)} tokens) has no {IMAGE_TOKEN!r} token. "
                f"MAGMA's tokenizer is GPT-2's with {IMAGE_TOKEN!r} added as a special token: "
                "`magma_hf.processing_magma.add_magma_special_tokens(tokenizer)` adds it (id 50257 for GPT-2)."
            )
        return token_id

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image, from the image processor's crop size."""
        crop = self.image_processor.crop_size
        return (crop["height"] // FEATURE_STRIDE) * (crop["width"] // FEATURE_STRIDE)

    def _get_num_multimodal_tokens(self, image_sizes: list[list[int]] | None = None, **kwargs) -> MultiModalData:
        """The image tokens a call inserts per image, as vLLM and transformers ask a processor (LLaVA's has it).

        Args:
            image_sizes: `(height, width)` of each image before preprocessing. Every image is resized and cropped to
                the image processor's `crop_size`, so each gets `num_image_tokens` tokens, in one patch.
            kwargs: Processing kwargs (vLLM passes them); they do not change the count, which a call takes from
                `crop_size` too.
        """
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        self._check_text(text)
        if images is not None:  # the image processor's own loader, naming a URL or path it cannot read
            images = load_images_naming_the_source(images, self.image_processor.fetch_images)
        images, text, videos, audio = super().prepare_inputs_layout(
            images=images, text=text, videos=videos, audio=audio, **kwargs
        )
        if images is not None:
            text = self._put_images_in_front(images, text)
        return images, text, videos, audio

    @staticmethod
    def _check_text(text) -> None:
        """A string or a list of strings; anything else fails later as "'int' object is not iterable"."""
        if text is None or isinstance(text, str):
            return
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        wrong = [f"text[{n}] is {type(item).__name__}" for n, item in enumerate(text) if not isinstance(item, str)]
        if wrong:
            raise TypeError(f"text must be a string or a list of strings: {', '.join(wrong[:5])}")

    def _put_images_in_front(self, images, text: list[str] | None) -> list[str]:
        """MAGMA's layout for text without placeholders: the sample's images come first."""
        if text is None:
            if self._is_nested(images):  # one caption prompt per list: the grouping given is kept
                empty = next((number for number, sample in enumerate(images) if not sample), None)
                if empty is not None:
                    raise ValueError(f"images[{empty}] is an empty list and there is no text for it: nothing to do")
                return [self.image_token * len(sample) for sample in images]
            return [self.image_token] * len(make_flat_list_of_images(images))
        per_sample = self._images_per_sample(images, text)
        if per_sample is None:
            return text  # explicit placeholders in a flat batch: `validate_inputs` checks the counts
        for number, (count, sample) in enumerate(zip(per_sample, text)):
            placeholders = sample.count(self.image_token)
            if placeholders and placeholders != count:  # the totals may agree while images move between prompts
                raise ValueError(
                    f"The number of {self.image_token} tokens in each prompt should be the same as the number of "
                    f"images passed for it: text[{number}] has {placeholders} {self.image_token} tokens and {count} "
                    "images."
                )
        return [place_images_in_front(sample, count) for count, sample in zip(per_sample, text)]

    def _images_per_sample(self, images, text: list[str]) -> list[int] | None:
        """How many images belong to each text: from nested lists, or one each (or all for a single text)."""
        n_images = len(make_flat_list_of_images(images))
        if self._is_nested(images):
            if len(images) != len(text):
                raise self._count_mismatch(text, n_images, f"{len(images)} lists of images for {len(text)} texts")
            return [len(sample_images) for sample_images in images]
        if any(self.image_token in sample for sample in text):
            return None
        if len(text) == 1:
            return [n_images]
        if n_images == len(text):
            return [1] * n_images
        raise self._count_mismatch(text, n_images, f"{n_images} images for {len(text)} texts")

    @staticmethod
    def _is_nested(images) -> bool:
        """Images given as one list per sample (`[[a, b], [c]]`)."""
        return isinstance(images, (list, tuple)) and bool(images) and isinstance(images[0], (list, tuple))

    def _count_mismatch(self, text: list[str], n_images: int, got: str) -> ValueError:
        """transformers' message for images and placeholders that disagree, with MAGMA's rule for text without
        placeholders (its images go in front)."""
        n_placeholders = sum(sample.count(self.image_token) for sample in text)
        return ValueError(
            f"The total number of {self.image_token} tokens in the prompts should be the same as the number of images "
            f"passed. Found total {n_placeholders} {self.image_token} tokens and {n_images} images. Got {got}: pass "
            f"one image (or one list of images) per text, or mark where each image goes with {self.image_token}."
        )

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """MAGMA's clean-up of generated ids, one text per sequence (a single sequence gives a list of one): image
        tokens and everything from the first end-of-text on are dropped; `kwargs` go to the tokenizer's `decode`."""
        if hasattr(generated_outputs, "tolist"):
            generated_outputs = generated_outputs.tolist()
        if generated_outputs and not isinstance(generated_outputs[0], (list, tuple)):
            generated_outputs = [generated_outputs]
        return [
            self.tokenizer.decode(self._until_eos(ids), skip_special_tokens=skip_special_tokens, **kwargs)
            for ids in generated_outputs
        ]

    def _until_eos(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        eos = self.tokenizer.eos_token_id
        # Left padding repeats eos before the prompt; only an eos after the first real token ends the text.
        start = next((n for n, i in enumerate(ids) if i != eos), len(ids))
        end = next((n for n in range(start, len(ids)) if ids[n] == eos), len(ids))
        return [i for i in ids[start:end] if i != self.image_token_id]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = [
    "MagmaProcessor",
    "add_magma_special_tokens",
    "check_processor_matches_model",
    "load_images_naming_the_source",
]
