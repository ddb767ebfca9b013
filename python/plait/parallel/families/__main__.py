"""``python -m plait.parallel.families``: print docs/model-fields.md."""
from . import fields_markdown

print(fields_markdown())
