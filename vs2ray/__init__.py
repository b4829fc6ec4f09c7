"""vs2ray: Visual Sparse Steering (VS2, VS2++, PASS) experiments as distributed sweeps on Ray."""

__version__ = "0.1.0"
