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
    packages=find_packages(include=["fastdino", "fastdino.*"]) + ["fastdino_kernels", "fastdino.configs"],
    # The top-level configs/ folder ships inside the package as fastdino/configs/, so an installed
    # fastdino finds default.yaml and `--config demo` outside a source checkout (fastdino.config.CONFIG_DIR).
    package_dir={"fastdino_kernels": "kernels", "fastdino.configs": "configs"},
    package_data={"fastdino.configs": ["*.yaml", "launch/*"]},
    install_requires=[
        "torch>=2.10",
        "triton",
        "xformers",
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
    # ffcv (.beton data; compiled from source against pkg-config, libturbojpeg0-dev and libopencv-dev) and
    # deepspeed (ZeRO, several ranks) are extras, so that fastdino installs where FFCV cannot be built;
    # without them the rest runs (data.path=synthetic) and asking for them is one line saying how to install.
    # dev: transformers for the Hugging Face export test (tests/test_hf.py; it needs no other torch) and
    # tensorboard for the events test (training writes events wherever tensorboard is installed).
    extras_require={"ffcv": ["ffcv==1.0.2"], "deepspeed": ["deepspeed"],
                    "dev": ["pytest>=8", "pytest-timeout", "transformers", "tensorboard"],
                    "gpu": ["nvidia-nvimgcodec-cu13[nvjpeg]", "nvidia-nvjpeg>=13,<14"]},
    entry_points={"console_scripts": ["fastdino=fastdino.cli:main"]},
)
