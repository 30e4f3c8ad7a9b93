"""fromage: FROMAGe (Koh et al., ICML 2023) on any Hugging Face LM and image encoder."""

from typing import TYPE_CHECKING, Any

from .config import DataConfig, EncoderConfig, LMConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from .model import FromageModel
    from .pipeline import Fromage

__version__ = "0.1.0"
__all__ = ["Fromage", "FromageModel", "ModelConfig", "LMConfig", "EncoderConfig", "DataConfig", "TrainConfig"]


def __getattr__(name: str) -> Any:
    # The model and the pipeline pull in torch (~4 s): commands that may not need it
    # (`fromage index` on an up-to-date collection) stay fast.
    if name == "FromageModel":
        from .model import FromageModel

        return FromageModel
    if name == "Fromage":
        from .pipeline import Fromage

        return Fromage
    raise AttributeError(f"module 'fromage' has no attribute {name!r}")
