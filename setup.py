"""Installs zoo's top-level packages; the YAML configs travel as package data of `configs`."""
from setuptools import setup

setup(
    name="zoo",
    version="0.1.0",
    description="A from-scratch, pure-PyTorch model zoo for diffusion research.",
    packages=["zoo", "layers", "samplers", "lora", "checkpoints_convert", "configs"],
    package_data={"configs": ["*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=["torch", "einops", "safetensors", "numpy", "pyyaml"],
    extras_require={"test": ["pytest", "diffusers", "peft", "transformers", "accelerate"]},
)
