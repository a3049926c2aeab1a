"""The run's loggers (`trainer.logger`): Lightning's own CSV, TensorBoard, MLflow and W&B loggers, all fed the
same metric names as metrics.csv. MLflow writes to output_dir/mlruns and W&B offline into output_dir/wandb
unless their own environment variables (MLFLOW_TRACKING_URI, WANDB_MODE=online) say otherwise.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dinov3ds.config import Config
from dinov3ds.errors import UserError

LOGGER_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # trainer.logger entries that need an extra


def check_loggers(names: list[str]) -> None:
    """Each asked logger's package is installed, else one line naming the extra (before any file is written)."""
    for name in names:
        package = LOGGER_PACKAGES.get(name)
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise UserError(f"trainer.logger: {name} is not installed; pip install 'dinov3ds[{name}]' (or "
                            f"pip install {package}), or remove {name} from trainer.logger") from None  # fmt: skip


def build_logger(name: str, config: Config, output_dir: Path):
    """Lightning's own logger for `name`; every one receives the same metric names as metrics.csv."""
    if name == "csv":
        return CSVLogger(save_dir=str(output_dir), name="", version="")
    if name == "tensorboard":
        return TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version="")
    run_name = Path(config.output_dir).name
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
        return MLFlowLogger(experiment_name="dinov3ds", run_name=run_name, tracking_uri=uri)
    from lightning.pytorch.loggers import WandbLogger

    offline = os.environ.get("WANDB_MODE", "offline") != "online"
    return WandbLogger(name=run_name, project="dinov3ds", save_dir=str(output_dir), offline=offline)
