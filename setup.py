from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent


def read_requirements(name):
    lines = (here / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="msvit-kernels",
    version="0.1.0",
    description="MSViT: dynamic mixed-scale tokenization for Vision Transformers, on packed varlen tokens",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["msvit", "msvit.*", "msvit_kernels", "msvit_kernels.*"]),
    package_data={"msvit": ["pretrained/*/*"]},
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "dev": read_requirements("requirements-dev.txt"),
        "triton": ["triton>=3.4"],
        "flash": ["flash-attn>=2.5"],
    },
    entry_points={"console_scripts": ["msvit=msvit.cli:main"]},
)
