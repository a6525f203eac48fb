"""Build and install reasoncache.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the
``reasoncache.kernels`` subpackage (never as a top-level ``kernels`` module).
"""

from setuptools import setup

setup(
    name="reasoncache",
    version="0.1.0",
    description="Prefix-augmented flash attention (Triton, CUDA, PyTorch) for prefix tuning frozen LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["reasoncache", "reasoncache.kernels"],
    package_dir={"reasoncache": "reasoncache", "reasoncache.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.56",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # the embedded default model (SmolLM2-135M-Instruct GGUF) and the demo's baselines and plot
        "demo": ["gguf", "peft", "matplotlib", "accelerate"],
        "test": ["pytest>=8", "ruff>=0.6", "gguf", "peft", "matplotlib", "accelerate"],
    },
    entry_points={"console_scripts": ["reasoncache = reasoncache.cli:main"]},
)
