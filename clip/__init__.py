"""nanoprompt's small CLIP, with OpenAI's API: `clip.load`, `clip.tokenize`, `model.encode_image`, `model.encode_text`."""
from .clip import LoadError, available_models, load
from .model import CLIP, build_model
from .tokenizer import tokenize
