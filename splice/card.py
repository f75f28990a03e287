"""Model cards: the README.md written beside every checkpoint splice makes."""

from __future__ import annotations

from collections.abc import Sequence

import splice


def model_card(
    operation: str,
    sources: Sequence[str],
    *,
    recipe: str | None = None,
    details: str = "",
    tags: Sequence[str] = (),
) -> str:
    """Markdown card stating what was done (``operation``), from what, and the recipe (YAML)."""
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
