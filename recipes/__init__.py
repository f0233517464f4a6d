"""Recipes: YAML configs for ``ko-lightning fit`` and the path comparison (:mod:`recipes.compare_paths`).

The library (``ko_lightning``) never imports from here.
"""
