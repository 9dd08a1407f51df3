from setuptools import find_packages, setup

setup(
    name="transformer-kernels",
    version="0.1.0",
    description="Fused Triton kernels (causal attention, softmax, layer/RMS norm) with a reference PyTorch "
    "transformer, equivalence tests and a benchmark suite",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "transformer", "transformer.*",
                                    "benchmarks", "benchmarks.*"]),
    package_data={"transformer": ["data/*.txt"]},
    # triton 3.5: the first with triton.knobs.nvidia.dump_ptxas_log, which the GPU build report reads.
    install_requires=["torch>=2.5", "triton>=3.5,<4", "numpy>=1.24"],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "transformers>=4.56,<5.25"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4"],
        "hf": ["transformers>=4.56,<5.25"],
    },
)
