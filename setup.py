"""Install megatron_lc. Install torch first (CPU: `pip install torch==2.13.0`, or your CUDA build), then
`pip install -e ".[dev]"`; the torch requirement below is a range so pip keeps the torch you already have."""
from setuptools import find_packages, setup

packages = find_packages(include=["megatron_lc", "megatron_lc.*"])
setup(
    name="megatron_lc",
    version="0.1.0",
    description="Long-context LLM training for Qwen2-style models: context parallelism, Triton kernels, recipes.",
    python_requires=">=3.10",
    # The top-level kernels/ folder installs as megatron_lc.kernels, so nothing claims the bare name `kernels`.
    packages=packages + ["megatron_lc.kernels"],
    package_dir={"megatron_lc.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "numpy",
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "datasketch",
        "sentencepiece",
        "tokenizers",  # eval/data read Qwen2 tokenizer.json at run time
        "matplotlib",  # eval niah|loss, data mix and bench write PNGs
        "pyarrow",  # data stages read Parquet input
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "transformers>=4.45", "ruff", "pylint", "triton; platform_system == 'Linux'",
                "megatron-core"],
        "gpu": ["triton", "flash-attn", "ring-flash-attn", "liger-kernel"],
    },
    entry_points={"console_scripts": ["megatron-lc=megatron_lc.cli:main"]},
)
