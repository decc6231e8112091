"""`clip.load`: OpenAI's published checkpoints (ViTs and ResNets), or a local file, -> (model, preprocess).

Accepted files: OpenAI's TorchScript archives (what the URLs below serve) and plain state dicts saved with
`torch.save` (read with `weights_only=True`), OpenAI's key layout, including open_clip's state dicts of
OpenAI-architecture models. Downloads go to a temporary file that is renamed only after its sha256 matches.
"""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch
from torchvision import transforms as T
from tqdm import tqdm

from .model import build_model

_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
_MODELS = {  # name -> (sha256, file name); the hash is part of OpenAI's URL
    "RN50": ("afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    "RN101": ("8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    "RN50x4": ("7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    "RN50x16": ("52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    "RN50x64": ("be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class LoadError(RuntimeError):
    """`load` could not make a CLIP of what it was given: an unknown name, no network, a damaged or foreign file."""


def available_models():
    return list(_MODELS)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(name, root):
    """Path of the checked file for an OpenAI model name, downloading it if it is not cached yet."""
    expected, filename = _MODELS[name]
    url = _URL.format(expected, filename)
    target = Path(root).expanduser() / filename
    if target.exists():
        if sha256(target) == expected:
            return target
        print(f"{target} does not match its sha256; downloading it again")
    created = not target.parent.exists()  # a failed download leaves no new cache folder behind
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=filename + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url) as src:
                total = int(src.headers.get("Content-Length") or 0)
                with tqdm(total=total, unit="B", unit_scale=True, desc=filename) as bar:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        got = sha256(tmp)
        if got != expected:
            raise LoadError(f"downloaded {url} has sha256 {got}, expected {expected}; refusing it "
                               f"(the cached file, if any, was left as it was). Try again later.")
        os.replace(tmp, target)  # the cached file changes only now, and only to a verified one
    except urllib.error.URLError as e:
        raise LoadError(f"could not download {url} ({e.reason}). Without network, download that file "
                           f"elsewhere and put it at {target}, or pass a local checkpoint path.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if created and not any(target.parent.iterdir()):
            target.parent.rmdir()
    return target


def _read_state_dict(path):
    """A state dict from a TorchScript archive or a torch.save'd dict, with a clear error for anything else."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                is_torchscript = any(n.endswith("constants.pkl") for n in z.namelist())
            if is_torchscript:
                return torch.jit.load(path, map_location="cpu").state_dict()
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(f"{path} is not a readable CLIP checkpoint (truncated or corrupt?): {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # an open_clip training checkpoint
    if not isinstance(sd, dict):
        raise LoadError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def transform(resolution):
    """CLIP's test-time preprocessing: shorter side to `resolution` (bicubic), center crop, CLIP mean/std."""
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(MEAN, STD)])


def load(name_or_path, device=None, jit=False, download_root=None):
    """(model, preprocess) for an OpenAI model name (see available_models()) or a checkpoint path, on `device`
    (default: CUDA when there is one, as OpenAI's). jit=False is OpenAI's eager model, the only kind built here
    (a TorchScript archive's weights are read into it); jit=True, OpenAI's TorchScript model, is refused.
    Head counts are not in the checkpoint: heads = width / 64 is assumed, OpenAI's rule (see build_model)."""
    if jit:
        raise LoadError("jit=True (OpenAI's TorchScript model) is not supported: pass jit=False, the eager model")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name_or_path in _MODELS:
        path = _download(name_or_path, download_root or os.path.join("~", ".cache", "clip"))
    elif os.path.isfile(os.path.expanduser(str(name_or_path))):
        path = Path(name_or_path).expanduser()
    else:
        raise LoadError(f"{name_or_path!r} is neither a known model ({', '.join(_MODELS)}) nor a file")
    try:
        model = build_model(_read_state_dict(path)).to(device)
    except (KeyError, ValueError) as e:  # not a CLIP's state dict: say which file
        raise LoadError(f"{path}: {e.args[0] if e.args else e}") from e
    return model, transform(model.visual.input_resolution)
