"""MkDocs hook: the site's home page is README.md itself (one source for both), its links to `docs/...` made
relative to the docs folder."""

from pathlib import Path

README = Path(__file__).with_name("README.md")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return README.read_text().replace("](docs/", "](")
