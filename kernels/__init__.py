"""Tunable kernels, each with a plain reference implementation.

This is autotune's own ``kernels`` package. Hugging Face ships a different package of the
same import name; install autotune into its own virtual environment (``make`` does).
"""

__all__ = [
    "ATTENTION_IMPLS", "Segments", "prefix_causal_attention", "varlen_attention",
    "varlen_attention_reference",
]


def __getattr__(name: str):  # torch loads only when a kernel is used
    if name in __all__:
        from kernels import attention

        return getattr(attention, name)
    raise AttributeError(name)
