"""Built-in YAML recipes, installed as ``fastgen_diffusers.recipes``."""
