"""fastdino: a fast DINO (self-supervised ViT) training engine.

The top-level `kernels/` folder installs as `fastdino_kernels`: the bare name
`kernels` belongs to a Hugging Face package that transformers pulls in.
"""
from setuptools import find_packages, setup

setup(
    name="fastdino",
    version="0.1.0",
    description="Fast DINO self-supervised ViT training: FFCV data, xformers attention, Triton kernels, DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdino", "fastdino.*"]) + ["fastdino_kernels"],
    package_dir={"fastdino_kernels": "kernels"},
    install_requires=[
        "torch>=2.10",
        "triton",
        "xformers",
        "ffcv==1.0.2",
        "deepspeed",
        "numpy",
        "omegaconf>=2.3",
        "tqdm",
        "safetensors",
        "matplotlib",
        "pillow",
        "scikit-learn",  # ships the digits data set the demo trains on
        "scikit-image",  # ships the sample photos the demo draws attention maps for
    ],
    # gpu: batched JPEG decode on the GPU (nvJPEG through nvImageCodec, CUDA 13 wheels). nvImageCodec
    # imports without nvJPEG but then cannot decode on the GPU: its nvjpeg extra brings the library
    # (nvidia-nvjpeg, which it leaves unpinned: the CUDA 13 series is the one its wheel loads).
    extras_require={"dev": ["pytest>=8", "pytest-timeout"],
                    "gpu": ["nvidia-nvimgcodec-cu13[nvjpeg]", "nvidia-nvjpeg>=13,<14"]},
    entry_points={"console_scripts": ["fastdino=fastdino.cli:main"]},
)
