"""ai-toolkit's job YAML (ostris/ai-toolkit): read one as our recipe, write a recipe as one.

    from trainer.recipe import ai_toolkit
    imported = ai_toolkit.read(data, path)   # every key honoured, noted, or unsupported with why
    text = ai_toolkit.write(recipe)          # reads back to the same recipe, but what it can't say

`read` is the `Format` reader of formats.FORMATS; `python -m trainer config FILE --write OUT.yaml
--to ai-toolkit` writes one. Modules: `reader` (the job, network, save, model, sample), `train`,
`datasets`, `layers` (which FLUX layers a network trains), `writer`.
"""

from .reader import read
from .writer import Export, export, write

__all__ = ["Export", "export", "read", "write"]
