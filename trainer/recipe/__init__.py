"""Training recipes as text: our own format (sections of dataclasses; `train` is TrainConfig),
read from YAML or JSON, written back, and told apart from other tools' config files.

    from trainer.recipe import Recipe, load, to_yaml
    imported = load("my_recipe.yaml")      # format, recipe, honoured / unsupported keys, notes
    text = to_yaml(imported.recipe)        # reads back to the same recipe
"""

from .fields import RecipeError
from .formats import FORMATS, Format, Imported, load
from .schema import Recipe, all_keys
from .text import UnreadableConfig, loads, to_json, to_yaml

__all__ = ["FORMATS", "Format", "Imported", "Recipe", "RecipeError", "UnreadableConfig", "all_keys", "load", "loads",
           "to_json", "to_yaml"]
