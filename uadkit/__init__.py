"""uadkit: unsupervised visual anomaly detection (STFPM, PatchCore, PaDiM) with a PaddleX-style CLI."""

__version__ = "0.1.0"

from .engine.device import flush_subnormals  # noqa: E402

flush_subnormals()  # torch's threads start flushing subnormal floats, which slow CPU training (engine/device.py)

from .api import AnomalyDetector, create_model  # noqa: E402
from .pipeline import create_pipeline  # noqa: E402

__all__ = ["AnomalyDetector", "create_model", "create_pipeline", "__version__"]
