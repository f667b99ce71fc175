"""Data pipeline: raw count matrices -> sparse webdataset corpus -> packed batches.

Commands: ``python -m data_pipeline {convert,merge,verify,inspect,to-h5ad,synthetic}``.
"""
