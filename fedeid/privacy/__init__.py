"""Differential privacy (central accounting, local DP-SGD with Opacus) and transport certificates."""
