"""fromage: FROMAGe (Koh et al., ICML 2023) on any Hugging Face LM and image encoder."""

from .config import DataConfig, EncoderConfig, LMConfig, ModelConfig, TrainConfig
from .model import FromageModel

__version__ = "0.1.0"
__all__ = ["FromageModel", "ModelConfig", "LMConfig", "EncoderConfig", "DataConfig", "TrainConfig"]
