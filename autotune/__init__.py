"""autotune: a profiling-driven autotuner for training transformers on variable-length data.

``import autotune`` works without CUDA, Triton, NVML or PostgreSQL; optional pieces import
lazily and say what to install when missing.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
