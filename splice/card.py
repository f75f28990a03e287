"""Model cards: the README.md written beside every checkpoint splice makes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

import splice


def shown_source(source: str) -> str:
    """How a card names a source: a hub id for a folder of the hub cache (a model given as
    ``org/name`` is opened from ``.../models--org--name/snapshots/<revision>``), else the
    source as given (a local path as the user typed it, relative or not)."""
    parts = PurePath(source).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo = part.removeprefix("models--").split("--")
            if all(repo):
                return "/".join(repo)
    return source


def model_card(
    operation: str,
    sources: Sequence[str],
    *,
    recipe: str | None = None,
    details: str = "",
    tags: Sequence[str] = (),
) -> str:
    """Markdown card stating what was done (``operation``), from what, and the recipe (YAML).

    A source opened from the hub cache is named by its hub id (:func:`shown_source`), in
    ``details`` too."""
    shown = {s: shown_source(s) for s in map(str, sources)}
    sources = list(dict.fromkeys(shown.values()))
    for path, hub_id in shown.items():
        if path != hub_id:
            details = details.replace(path, hub_id)
    lines = ["---", "library_name: transformers", "tags:", "- splice"]
    lines += [f"- {t}" for t in tags]
    if sources:
        lines.append("base_model:")
        lines += [f"- {s}" for s in sources]
    lines += ["---", "", f"# {operation}", ""]
    lines.append(f"Made with [splice](https://github.com/splice-llm/splice) {splice.__version__}.")
    lines.append("")
    if sources:
        lines.append("Sources:")
        lines += [f"- `{s}`" for s in sources]
        lines.append("")
    if details:
        lines += [details.rstrip(), ""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)
