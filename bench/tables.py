"""The figures tables the benchmarks print: a value, its baseline, and their ratio."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ratio_table"]


def ratio_table(
    headers: tuple[str, str, str, str],
    rows: Iterable[tuple[str, str, float, float]],
    widths: tuple[int, int, int, int],
) -> str:
    """A Markdown table; each row is (label, format, value, baseline), the ratio computed."""
    w0, w1, w2, w3 = widths
    out = [
        f"| {headers[0]:<{w0}} | {headers[1]:>{w1}} | {headers[2]:>{w2}} | {headers[3]:>{w3}} |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for label, fmt, value, base in rows:
        ratio = f"{value / base:.2f}x" if base else "-"
        out.append(
            f"| {label:<{w0}} | {fmt.format(value):>{w1}} | {fmt.format(base):>{w2}} "
            f"| {ratio:>{w3}} |"
        )
    return "\n".join(out)
