"""One self-contained HTML page: headings, text, tables, figures and images, all inline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgtrain.directories.atomic import atomic_file

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1180px;
       padding: 0 16px; color: #1d2433; background: #fff; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d8dde6; }
.lead { color: #4a5468; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #d8dde6; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 1.35em; } .card span { color: #4a5468; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d8dde6; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f3f5f9; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eef0f4; }
figcaption { color: #4a5468; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
.mistake { width: 200px; font-size: 0.85em; word-break: break-all; }
.mistake img { width: 200px; height: 200px; object-fit: contain; background: #f3f5f9; image-rendering: pixelated; }
.note { color: #4a5468; font-size: 0.9em; }
"""


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_png(figure, dpi: int = 100) -> bytes:
    """A matplotlib Figure (made without pyplot) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi)
    return out.getvalue()


class Page:
    """Build a page part by part; ``text`` is escaped everywhere unless said otherwise."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, anchor: str = "") -> None:
        ident = f' id="{html.escape(anchor)}"' if anchor else ""
        self.parts.append(f"<h2{ident}>{html.escape(text)}</h2>")

    def paragraph(self, text: str, css: str = "") -> None:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>' if css else f"<p>{html.escape(text)}</p>")

    def cards(self, figures: Iterable[tuple[str, str]]) -> None:
        """Headline figures, each a (value, what it is) pair."""
        cells = "".join(f"<div class=card><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>"
                        for v, k in figures)
        self.parts.append(f'<div class="cards">{cells}</div>')

    def table(self, header: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[bool] = ()) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = []
        for row in rows:
            cells = "".join(f'<td class="n">{html.escape(str(v))}</td>' if i < len(numeric) and numeric[i]
                            else f"<td>{html.escape(str(v))}</td>" for i, v in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")

    def figure(self, png: bytes, caption: str, alt: str, ident: str = "") -> None:
        name = f' id="{html.escape(ident)}"' if ident else ""
        self.parts.append(f'<figure{name}><img src="{png_uri(png)}" alt="{html.escape(alt)}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def gallery(self, items: Iterable[tuple[bytes | None, Sequence[str]]]) -> None:
        """Images with a few lines of text under each (no image: a note in its place)."""
        cells = []
        for png, lines in items:
            picture = (f'<img src="{png_uri(png)}" alt="{html.escape(lines[0])}">' if png is not None
                       else '<div class="note">(image not found)</div>')
            text = "<br>".join(html.escape(line) for line in lines)
            cells.append(f'<div class="mistake">{picture}<div>{text}</div></div>')
        self.parts.append(f'<div class="grid">{"".join(cells)}</div>')

    def extend(self, other: Page) -> None:
        """Another page's body, its title becoming a section heading."""
        self.parts.append(f"<h2>{html.escape(other.title)}</h2>")
        self.parts += [part.replace("<h2", "<h3").replace("</h2>", "</h3>") for part in other.parts[1:]]

    def render(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head>\n<body>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")

    def write(self, path: Path) -> Path:
        with atomic_file(path) as tmp:
            Path(tmp).write_text(self.render(), encoding="utf-8")
        return path
