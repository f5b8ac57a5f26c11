"""bonetumor: train, evaluate and explain CNN classifiers of bone-tumour images.

Python API (the CLI is a thin layer over these)::

    from bonetumor import TrainConfig, fit, evaluate, predict, load_checkpoint
    result = fit(TrainConfig(data="data/", weights="none", epochs=5), out="runs/r1")
    metrics = evaluate(result.run_dir / "best.pt", "data/", out="runs/r1/eval")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bonetumor")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from bonetumor.config import TrainConfig, load_config
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import read_image
from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.errors import BadImageError, BonetumorError
from bonetumor.evaluate.metrics import compute_metrics
from bonetumor.evaluate.run import evaluate
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import load_checkpoint
from bonetumor.predict import predict, predict_studies
from bonetumor.train import fit

__all__ = [
    "BadImageError", "BonetumorError", "ReadOptions", "TrainConfig", "compute_metrics", "create_model",
    "create_synthetic_dataset", "evaluate", "fit", "load_checkpoint", "load_config", "predict",
    "predict_studies", "read_image",
]
