"""Packaging for dynprompt-sb.

torch and torchaudio are given as ranges, never pinned: GPU users install
the CUDA build that suits their card first, and the CPU set-up in the
Makefile installs its own pinned CPU wheels before this package.
"""

from setuptools import find_packages, setup

setup(
    name="dynprompt-sb",
    version="0.1.0",
    description=(
        "Speaker-aware dynamic prompts for parameter-efficient speaker "
        "verification on a frozen WavLM, as a SpeechBrain extension"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dynprompt_sb", "dynprompt_sb.*"]),
    install_requires=[
        "torch>=2.7.1",
        "torchaudio>=2.7.1",
        "speechbrain>=1.1.2,<1.2",
        "transformers>=5.0,<6",
        "hyperpyyaml>=1.2.3",
        "soundfile>=0.12",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "yamllint>=1.35"],
    },
    entry_points={
        "console_scripts": ["dynprompt=dynprompt_sb.cli:main"],
    },
)
