"""tbsm-sdk build side: data, slicing, export, bundles and the `tbsm-sdk` CLI."""

__version__ = "0.1.0"
