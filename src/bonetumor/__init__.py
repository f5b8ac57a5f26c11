"""bonetumor: train, evaluate and explain CNN classifiers of bone-tumour images.

Python API (the CLI is a thin layer over these)::

    from bonetumor import TrainConfig, fit, evaluate, predict, load_checkpoint
    result = fit(TrainConfig(data="data/", weights="none", epochs=5), out="runs/r1")
    metrics = evaluate(result.run_dir / "best.pt", "data/", out="runs/r1/eval")
"""

import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bonetumor")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# The API's names load on first use (PEP 562), so that ``import bonetumor`` and the command
# line's --help do not pay for torch, torchvision and scikit-learn up front.
_EXPORTS = {
    "TrainConfig": "bonetumor.config", "load_config": "bonetumor.config", "ReadOptions": "bonetumor.data.pixels",
    "read_image": "bonetumor.data.readers", "create_synthetic_dataset": "bonetumor.data.synth",
    "BadImageError": "bonetumor.errors", "BonetumorError": "bonetumor.errors",
    "compute_metrics": "bonetumor.evaluate.metrics", "evaluate": "bonetumor.evaluate.run",
    "create_model": "bonetumor.model.backbones", "load_checkpoint": "bonetumor.model.checkpoint",
    "predict": "bonetumor.predict", "predict_studies": "bonetumor.predict", "fit": "bonetumor.train",
}


class _Package(types.ModuleType):
    """The import system sets each submodule as an attribute of its package; where an API
    function has its submodule's name (``evaluate``, ``predict``), the function keeps the name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'bonetumor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "BadImageError", "BonetumorError", "ReadOptions", "TrainConfig", "compute_metrics", "create_model",
    "create_synthetic_dataset", "evaluate", "fit", "load_checkpoint", "load_config", "predict",
    "predict_studies", "read_image",
]
