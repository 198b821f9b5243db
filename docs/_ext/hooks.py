"""MkDocs hooks for the documentation site (``hooks:`` in ``mkdocs.yml``).

1. **Math.** ``$...$`` (inline) and ``$$ ... $$`` (a paragraph of its own) are LaTeX, the syntax
   GitHub renders too. At build time each formula becomes MathML (the ``latex2mathml`` package of
   the ``docs`` extra), which browsers draw natively: no script, no font download, so the site
   renders the same opened from disk, offline. A formula that does not convert fails the build and
   names the page.
2. **Checks on every built page**, reported as warnings, so ``mkdocs build --strict`` fails on them:
   Sphinx roles left in the text (``:func:`x```), a ``$`` that did not become math, an API entry
   with an empty body (undocumented hook or internal state), and a cross-reference into
   ``lightning_muon`` that resolved to nothing.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as etree
from typing import Any

import markdown
from latex2mathml.converter import convert as latex_to_mathml
from markdown.blockprocessors import BlockProcessor
from markdown.inlinepatterns import InlineProcessor
from mkdocs.plugins import event_priority, get_plugin_logger

log = get_plugin_logger("lightning_muon_docs")

# ------------------------------------------------------------------------------------------- math
# Inline: $x$ with no space just inside the dollars, not preceded by a backslash or a word character,
# not followed by a digit (GitHub's rule, so "$5 and $6" stays text).
_INLINE = r"(?<![\\\w$])\$(?![\s$])((?:\\.|[^$\\\n])+?)(?<!\s)\$(?![\d$])"


def to_mathml(tex: str, display: bool) -> str:
    """``tex`` as a ``<math>`` element (``display="block"`` for a display formula)."""
    mathml = latex_to_mathml(tex.strip(), display="block" if display else "inline")
    # keep the source as the accessible label and as what copy-paste yields in most browsers
    return mathml.replace("<math ", f'<math alttext="{html.escape(tex.strip(), quote=True)}" ', 1)


class _InlineMath(InlineProcessor):
    def handleMatch(self, m: re.Match, data: str) -> tuple[str, int, int]:  # noqa: N802 (Markdown's API)
        return self.md.htmlStash.store(to_mathml(m.group(1), display=False)), m.start(0), m.end(0)


class _BlockMath(BlockProcessor):
    """A paragraph that starts with ``$$`` and ends with ``$$`` (possibly several lines)."""

    def test(self, parent: etree.Element, block: str) -> bool:
        return block.lstrip().startswith("$$")

    def run(self, parent: etree.Element, blocks: list[str]) -> bool:
        parts = []
        while blocks:
            parts.append(blocks.pop(0))
            text = "\n\n".join(parts).strip()
            if len(text) > 2 and text.endswith("$$"):
                div = etree.SubElement(parent, "div", {"class": "math-display"})
                div.text = self.parser.md.htmlStash.store(to_mathml(text[2:-2], display=True))
                return True
        blocks[:0] = parts  # no closing $$: leave the text as it is
        return False


class MathExtension(markdown.Extension):
    """``$...$`` and ``$$...$$`` to MathML at build time (see the module docstring)."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 (Markdown's API)
        # after code spans (190), before backslash escapes (180) and emphasis: "a*b" inside math stays
        md.inlinePatterns.register(_InlineMath(_INLINE, md), "lm_inline_math", 185)
        # after indented code (80), before paragraphs
        md.parser.blockprocessors.register(_BlockMath(md.parser), "lm_block_math", 75)


@event_priority(100)  # before mkdocstrings reads the extensions, so docstrings get math as well
def on_config(config: Any) -> Any:
    config.markdown_extensions.append(MathExtension())
    return config


# ------------------------------------------------------------------------------------------ checks
_SPHINX_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`")
_EMPTY_ENTRY = re.compile(
    r'<h\d id="(?P<id>[\w.]+)" class="doc doc-heading">(?:(?!<h\d ).)*?<div class="doc doc-contents ">\s*</div>',
    flags=re.S,
)
_UNRESOLVED = re.compile(r'<span title="(lightning_muon\.[\w.]+)"><code class="lm-role">')
_CODE = re.compile(r"<(pre|code|script|style)\b.*?</\1>", flags=re.S)
_TAGS = re.compile(r"<[^>]+>")


def page_problems(output: str) -> list[str]:
    """What is wrong with one built page's HTML (empty when nothing is)."""
    problems = []
    main = output.split('<article class="md-content__inner md-typeset">', 1)[-1].split("</article>", 1)[0]
    text = html.unescape(_TAGS.sub(" ", _CODE.sub(" ", main)))
    if m := _SPHINX_ROLE.search(text):
        problems.append(f"a Sphinx role left in the text: {text[m.start() : m.start() + 60]!r}")
    for m in re.finditer(r"\$", text):
        problems.append(f"a '$' that is not math: {text[max(0, m.start() - 30) : m.start() + 30]!r}")
        break
    empty = [m["id"] for m in _EMPTY_ENTRY.finditer(main) if m["id"].startswith("lightning_muon")]
    if empty:
        problems.append(f"{len(empty)} API entries with an empty body, e.g. {empty[:3]}")
    unresolved = sorted(set(_UNRESOLVED.findall(main)))
    if unresolved:
        problems.append(f"cross-references to nothing: {unresolved[:5]}")
    return problems


def on_post_page(output: str, page: Any, config: Any) -> str:
    for problem in page_problems(output):
        log.warning("%s: %s", page.file.src_uri, problem)
    return output
