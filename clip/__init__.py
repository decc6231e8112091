"""nanoprompt's small CLIP. OpenAI's API: `clip.load`, `clip.tokenize`, `model.encode_image`, `model.encode_text`."""
from .model import CLIP, build_model
