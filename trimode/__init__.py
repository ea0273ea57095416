"""trimode: one transformer, four decoders (ar, diffusion, linear and quadratic self-speculation)."""

from .config import ModelConfig as ModelConfig
from .decode import Generation as Generation
from .decode import Mode as Mode
from .decode import generate as generate
from .model import Transformer as Transformer
