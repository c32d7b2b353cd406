"""report.html: report.md rendered into one self-contained page, its figures inlined as
base64 PNGs, so the file can be mailed or attached to an issue and still show everything."""

from __future__ import annotations

import base64
import html
import xml.etree.ElementTree as ET
from collections.abc import Mapping

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

__all__ = ["render_html"]

# Inline, no web fonts or external sheets: the page must render the same offline.
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 90%; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; }
th { background: #f6f8fa; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 90%; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
img { max-width: 100%; height: auto; }
"""


class _InlineImages(Treeprocessor):
    """Points each <img> whose src names a figure at that figure's bytes instead."""

    def __init__(self, md: markdown.Markdown, images: Mapping[str, bytes]) -> None:
        super().__init__(md)
        self.images = images

    def run(self, root: ET.Element) -> None:
        for img in root.iter("img"):
            png = self.images.get(img.get("src", ""))
            if png is not None:
                img.set("src", "data:image/png;base64," + base64.b64encode(png).decode("ascii"))


class _InlineImagesExtension(Extension):
    def __init__(self, images: Mapping[str, bytes]) -> None:
        super().__init__()
        self.images = images

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 - Markdown's name
        # After "inline" (20), which turns ![alt](src) into <img>.
        md.treeprocessors.register(_InlineImages(md, self.images), "inline_images", 5)


def render_html(text: str, *, title: str, images: Mapping[str, bytes]) -> str:
    """``text`` (markdown) as a complete HTML page; ``images`` maps an image's src as the
    markdown writes it (``figures/x.png``) to the PNG bytes embedded in its place."""
    md = markdown.Markdown(extensions=["tables", "fenced_code", _InlineImagesExtension(images)])
    # Reports quote strings from measurements (failure reasons, log lines, config labels);
    # with raw HTML off, a '<' in one is shown as text rather than parsed as markup.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    body = md.convert(text)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            # An empty icon: otherwise the browser asks for /favicon.ico, an error offline.
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")
