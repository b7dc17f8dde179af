"""MagmaTrainer overrides `Trainer` methods, private ones among them: transformers may rename or change them in any
release, and an override that no longer matches is silently never called (or called wrongly). Each test names the
method that changed."""

import inspect

import pytest
from transformers import Trainer

from magma_hf.training.trainer import MagmaTrainer

# Overrides with Trainer's own parameters (names, order, kinds and defaults; annotations may differ).
SAME_PARAMETERS = [
    "_get_output_dir",
    "_save_checkpoint",
    "_save_optimizer_and_scheduler",
    "_load_from_checkpoint",
    "_prepare_for_training",
    "save_model",
    "create_optimizer",
    "create_scheduler",
    "compute_loss",
    "get_eval_dataloader",
    "get_train_dataloader",
    "get_resumed_dataloader",
    "evaluate",
]
# Overrides that pass Trainer's parameters on (`*args, **kwargs`): (the first positional parameter they read, the
# keyword parameters they read).
FORWARDED = {"__init__": ("model", ["data_collator", "processing_class"]), "train": ("resume_from_checkpoint", [])}


def overridden_names() -> list[str]:
    return sorted(name for name, value in vars(MagmaTrainer).items() if callable(value) and hasattr(Trainer, name))


def parameters(function) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def test_every_override_is_checked_here():
    assert overridden_names() == sorted([*SAME_PARAMETERS, *FORWARDED])


@pytest.mark.parametrize("name", [*SAME_PARAMETERS, *FORWARDED])
def test_overridden_method_still_exists_on_trainer(name):
    assert callable(getattr(Trainer, name, None)), (
        f"transformers.Trainer no longer has {name}: MagmaTrainer.{name} is never called; port it"
    )


@pytest.mark.parametrize("name", SAME_PARAMETERS)
def test_override_has_the_signature_of_trainer(name):
    ours, theirs = parameters(getattr(MagmaTrainer, name)), parameters(getattr(Trainer, name))
    assert ours == theirs, (
        f"transformers.Trainer.{name} changed its signature to {inspect.signature(getattr(Trainer, name))}; "
        f"MagmaTrainer.{name} has {inspect.signature(getattr(MagmaTrainer, name))}: port the override"
    )


@pytest.mark.parametrize(("name", "first", "keywords"), [(name, *used) for name, used in FORWARDED.items()])
def test_forwarding_override_reads_parameters_trainer_still_has(name, first, keywords):
    theirs = list(inspect.signature(getattr(Trainer, name)).parameters)[1:]  # without self
    assert theirs[0] == first and set(keywords) <= set(theirs), (
        f"transformers.Trainer.{name} now takes {theirs}; MagmaTrainer.{name} reads {first!r} as its first "
        f"argument and {keywords} by name: port the override"
    )
