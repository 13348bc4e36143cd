"""Packaging for unipt_scale; `kernels/` installs as `unipt_scale.kernels`."""
from setuptools import setup

setup(
    name="unipt_scale",
    version="0.1.0",
    description="UniPT parallel side-network tuning of large frozen backbones, at cluster scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["unipt_scale", "unipt_scale.data", "unipt_scale.bench", "unipt_scale.kernels"],
    package_dir={"unipt_scale": "unipt_scale", "unipt_scale.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "triton>=3.0",
        "transformers>=4.45",
        "accelerate>=0.34",
        "webdataset>=1.0",
        "safetensors>=0.4",
        "peft>=0.21",  # method=lora (LoRA adapters through peft.inject_adapter_in_model)
        "bitsandbytes>=0.45",  # backbone.quantization=int8/nf4 (CPU and CUDA) and the QLoRA baseline
        "matplotlib>=3.11.2",  # bench quality's charts (Agg backend)
        "rouge-score>=0.1.2",  # bench headlines: ROUGE-L of generated headlines
        "ninja",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["unipt=unipt_scale.cli:main"]},
)
