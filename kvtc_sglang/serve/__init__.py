"""Serve the stock SGLang HTTP server with the kvtc backend: model export, CPU shim, launcher, workloads.

``python -m kvtc_sglang.serve [--backend kvtc|vanilla] [any sglang flag ...]``
"""
