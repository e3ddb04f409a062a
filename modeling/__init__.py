"""The trust_remote_code payload: these files are copied beside every checkpoint we write.

They import only torch, transformers and each other (relative imports), so a checkpoint loads where mla-dsa is not
installed. Nothing is registered here: `__init__.py` is never copied.
"""
