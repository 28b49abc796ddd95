"""Installs zoo's top-level packages; the YAML configs travel as package data of `configs`."""
from setuptools import find_packages, setup

setup(
    name="zoo",
    version="0.1.0",
    description="A from-scratch, pure-PyTorch model zoo for diffusion research.",
    packages=find_packages(include=[f"{p}{s}" for p in ("zoo", "layers", "samplers", "lora", "checkpoints_convert",
                                                       "configs", "pipelines", "train") for s in ("", ".*")]),
    package_data={"configs": ["*.yaml", "recipes/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=["torch", "einops", "safetensors", "numpy", "pyyaml", "tqdm"],
    extras_require={
        "text": ["tokenizers", "sentencepiece"],
        "image": ["pillow"],
        "games": ["gymnasium", "ale-py", "pillow"],  # pillow: frame resizing and the PNG / GIF outputs
        "gguf": ["gguf"],
        # parity peers and every optional extra, so the whole suite runs
        "test": ["pytest", "pytest-xdist", "diffusers", "peft", "transformers", "accelerate",
                 "tokenizers", "sentencepiece", "protobuf", "pillow", "gymnasium", "ale-py", "gguf"],
    },
)
