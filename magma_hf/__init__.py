"""magma_hf: MAGMA (multimodal augmentation of GPT-J through adapters) as a native transformers model.

Importing the package registers the model with the Auto classes and with peft, and turns on the Hub code export of
`save_pretrained` (the saved folder then loads with `trust_remote_code=True` where this package is not installed).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .adapters_magma import (
    MagmaAdapterConfig,
    MagmaAdapterLayer,
    MagmaAdapterModel,
    MagmaPeftType,
    register_magma_peft_method,
)
from .configuration_magma import MagmaConfig, MagmaVisionConfig
from .image_processing_magma import TORCHVISION_BACKEND, MagmaImageProcessor, MagmaImageProcessorTorchvision
from .modeling_magma import (
    MagmaForConditionalGeneration,
    MagmaImageEncoder,
    MagmaModel,
    MagmaMultiModalProjector,
    MagmaPreTrainedModel,
)
from .pipeline_magma import MagmaImageToTextPipeline
from .processing_magma import MagmaProcessor

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    AutoConfig.register(MagmaConfig.model_type, MagmaConfig, exist_ok=True)
    AutoConfig.register(MagmaVisionConfig.model_type, MagmaVisionConfig, exist_ok=True)
    AutoModel.register(MagmaConfig, MagmaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MagmaConfig, MagmaForConditionalGeneration, exist_ok=True)
    # The faithful PIL processor for "pil" and "torchvision" (transformers asks for torchvision by default): the
    # torchvision one differs from it by rounding (README), so it is only given when asked for by its own name.
    AutoImageProcessor.register(
        MagmaConfig,
        image_processor_classes={
            "pil": MagmaImageProcessor,
            "torchvision": MagmaImageProcessor,
            TORCHVISION_BACKEND: MagmaImageProcessorTorchvision,
        },
        exist_ok=True,
    )
    AutoProcessor.register(MagmaConfig, MagmaProcessor, exist_ok=True)
    # Saved folders carry the code and an `auto_map`, so they load with trust_remote_code without this package.
    MagmaConfig.register_for_auto_class()
    MagmaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MagmaImageProcessor.register_for_auto_class("AutoImageProcessor")
    MagmaProcessor.register_for_auto_class("AutoProcessor")


_register_auto_classes()

__all__ = [
    "MagmaAdapterConfig",
    "MagmaAdapterLayer",
    "MagmaAdapterModel",
    "MagmaConfig",
    "MagmaForConditionalGeneration",
    "MagmaImageEncoder",
    "MagmaImageProcessor",
    "MagmaImageProcessorTorchvision",
    "MagmaImageToTextPipeline",
    "MagmaModel",
    "MagmaMultiModalProjector",
    "MagmaPeftType",
    "MagmaPreTrainedModel",
    "MagmaProcessor",
    "MagmaVisionConfig",
    "register_magma_peft_method",
]
