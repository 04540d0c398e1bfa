"""SGLang plugin: ``--kv-backend kvtc`` and the ``--kvtc-*`` options on a stock SGLang install."""
