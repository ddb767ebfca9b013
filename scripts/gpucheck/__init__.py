"""The GPU check behind ``make gpu-check``: a stage runner, plait's stages, and the summary.

``scripts/gpu_check.py`` is the command; see its docstring.
"""
