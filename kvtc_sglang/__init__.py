"""kvtc-sglang: KV Cache Transform Coding for SGLang's radix cache."""

__version__ = "0.1.0"
