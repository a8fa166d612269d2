"""The recipes shipped with diffusers-guda, installed as the package `diffusers_guda.recipe_data`.

One JSON file per recipe; see docs/formats.md#recipes and :mod:`diffusers_guda.recipes`.
"""
