"""Metal kernel sources (`*.metal` bodies for mx.fast.metal_kernel); shipped as package data."""
