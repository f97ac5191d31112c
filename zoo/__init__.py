"""Lightning-packaged transformers and data for lit-cosmos."""

from zoo.config import Config
from zoo.data import ByteTokenizer, TextDataModule
from zoo.model import GPT

__all__ = ["ByteTokenizer", "Config", "GPT", "TextDataModule"]
