"""qft_jax: fine-tune large language models on quantized weights, in JAX."""

import setuptools

setuptools.setup(
    name="qft_jax",
    version="0.1.0",
    description=("Quantized fine-tuning of LLMs in JAX/Flax: QFT, ApiQ, "
                 "ModuLoRA, HiFT and PEQA with Pallas low-bit kernels."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["qft_jax", "qft_jax.*",
                                               "pallas_kernels",
                                               "pallas_kernels.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tqdm>=4.66",
    ],
    extras_require={
        "gpu": ["jax[cuda12]>=0.10.2"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "torch>=2.4",
            "rouge-score>=0.1.2",
            "matplotlib>=3.8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
    },
)
