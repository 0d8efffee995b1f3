"""core"""

__version__ = "0.1.0"  # here, not in dn/__init__.py, so every layer can read it without importing up
