"""Packaging for unipt_scale; the Triton kernels in `kernels/src/` install as `unipt_scale.kernels`.

`kernels/` itself holds no `__init__.py`: the repository root is on `sys.path` whenever Python starts there
(`python -m ...`, `python -c`, notebooks), and a top-level package named `kernels` would hide the PyPI package
of that name, which transformers imports. Dependency ranges stop at the newest release tested; the exact
versions CI passed with are in constraints.txt (scripts/install.sh installs under them).
"""
from setuptools import setup

setup(
    name="unipt_scale",
    version="0.1.0",
    description="UniPT parallel side-network tuning of large frozen backbones, at cluster scale",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["unipt_scale", "unipt_scale.data", "unipt_scale.bench", "unipt_scale.encoders", "unipt_scale.tasks",
              "unipt_scale.kernels"],
    package_dir={"unipt_scale": "unipt_scale", "unipt_scale.kernels": "kernels/src"},
    # Each range stops at the newest release the test suite passed with (scripts/refresh-constraints.sh raises
    # these bounds together with constraints.txt).
    install_requires=[
        "torch>=2.4,<=2.13.0",
        "deepspeed>=0.15,<=0.19.8",
        "triton>=3.0,<=3.9.0",
        "transformers>=4.45,<=5.25.0",
        "tokenizers>=0.20,<=0.23.3",
        "huggingface-hub>=0.24,<=2.4.0",
        "accelerate>=0.34,<=1.16.0",
        "webdataset>=1.0,<=1.0.2",
        "safetensors>=0.4,<=0.8.0",
        "peft>=0.21,<=0.21.2",  # method=lora (LoRA adapters through peft.inject_adapter_in_model)
        "bitsandbytes>=0.45,<=0.50.2",  # backbone.quantization=int8/nf4 (CPU and CUDA) and the QLoRA baseline
        "matplotlib>=3.11.2,<=3.11.2",  # bench quality's charts (Agg backend)
        "rouge-score>=0.1.2,<=0.1.2",  # bench headlines: ROUGE-L of generated headlines
        "ninja<=1.13.2",
        "pyyaml>=6.0,<=6.0.4",
        "tqdm>=4.60,<=4.70.1",
        "tensorboard>=2.14,<=2.21.0",
        "pillow>=10,<=13.0.0",
        "numpy>=1.26,<=2.4.6",
    ],
    extras_require={
        "test": ["pytest>=7,<=9.2.0", "av>=12,<=18.1.0"],
        "video": ["av>=12,<=18.1.0"],  # decoding KEY.mp4 clips (video_retrieval); frame files need nothing more
    },
    entry_points={"console_scripts": ["unipt=unipt_scale.cli:main"]},
)
