"""The inventory loader: YAML files in, a validated :class:`certctl.model.Inventory` out.

``load_inventory(path, registry)`` is the one entry point. The modules, in the order
data flows through them:

* :mod:`.yamlload` -- safe YAML with a file:line:column for every key and item;
* :mod:`.schema` / :mod:`.compiler` -- JSON Schema (``schemas/inventory.schema.json``
  and connector ``config_schema``): a compiled fast path, operator-friendly messages;
* :mod:`.loader` -- files, merging across files, the build phases;
* :mod:`.kinds` / :mod:`.certificates` -- model objects, references, placements;
* :mod:`.names`, :mod:`.values`, :mod:`.policy`, :mod:`.templating` -- the rules
  for names, durations and keys, profiles and policies, and sandboxed Jinja2;
* :mod:`.problems` / :mod:`.context` -- located problem collection, shared state.
"""

from certctl.inventory.loader import load_inventory

__all__ = ["load_inventory"]
