"""CPU fast paths for the kernels/ torch references: small C kernels built at first use.

Built with the system C compiler into a per-user temp folder and loaded with ctypes (no torch
headers, so a build takes about a second). Where no compiler works, the references run.
"""
