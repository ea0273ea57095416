"""trimode: one transformer, four decoders (ar, diffusion, linear and quadratic self-speculation)."""

from .checkpoint import export_nld as export_nld
from .checkpoint import load_model as load_model
from .checkpoint import save_model as save_model
from .config import ModelConfig as ModelConfig
from .decode import Generation as Generation
from .decode import Mode as Mode
from .decode import generate as generate
from .model import Transformer as Transformer
from .tokenizer import Tokenizer as Tokenizer
from .tokenizer import load_tokenizer as load_tokenizer
