"""Finding where an engine goes wrong: ``diff`` compares a graph's values layer by layer with transformers' or
another stage's (``workbench diff``)."""
