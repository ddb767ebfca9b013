"""Rewrite the benchmark page (docs/benchmarks.md) from the result files in bench/results.

    python bench/report.py [--results DIR] [--readme PATH]   (PATH: docs/benchmarks.md by default)

Everything between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced by
one section per benchmark name. For the newest result of each device it shows a line
with device, commit, date and command, then ``results["table"]`` (``{"columns": [...],
"rows": [[...], ...]}``) when the result has one, or each of ``results["tables"]`` (the
same, each with a ``"title"`` line above it), then ``results["targets"]`` (name -> ``{"value",
"target", "met", "of"}``: ratios an issue asks for) as one more table when it has them, and
``<file>.png`` when a picture lies beside the JSON. The format of result files is set by ``bench/common.py``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
HERE = Path(__file__).resolve().parent


def load_results(directory: Path) -> list[dict[str, Any]]:
    """Every result file, each with its path under "_path"."""
    results = []
    for path in sorted(directory.glob("*.json")):
        document = json.loads(path.read_text())
        document["_path"] = path
        results.append(document)
    return results


def newest_per_device(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """benchmark name -> its newest result per device, names and devices sorted."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        key = (result["name"], result["device"])
        if key not in newest or result["date"] > newest[key]["date"]:
            newest[key] = result
    grouped: dict[str, list[dict[str, Any]]] = {}
    for (name, _device), result in sorted(newest.items()):
        grouped.setdefault(name, []).append(result)
    return grouped


def cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
    return text.replace("|", "\\|")


def markdown_table(table: dict[str, Any]) -> list[str]:
    columns = table["columns"]
    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    return lines


def targets_table(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``results["targets"]`` (name -> {value, target, met, of|why}) as a table."""
    rows = [[name, goal.get("value"), goal.get("target"), {True: "yes", False: "no"}.get(goal.get("met"), "n/a"),
             goal.get("of") or goal.get("why")] for name, goal in targets.items()]
    return {"columns": ["target", "value", "bound", "met", "of"], "rows": rows}


def render(results: list[dict[str, Any]], readme_dir: Path) -> str:
    if not results:
        return "No results yet: run `make bench`."
    lines: list[str] = []
    for name, per_device in newest_per_device(results).items():
        lines += [f"### {name}", ""]
        for result in per_device:
            commit = (result.get("commit") or "unknown")[:8]
            lines += [f"{result['device']} · commit `{commit}` · {result['date']} · `{result['command']}`", ""]
            payload = result.get("results", {})
            tables = payload.get("tables") or ([payload["table"]] if payload.get("table") else [])
            for table in tables:
                if table.get("title"):
                    lines += [f"**{table['title']}**", ""]
                lines += [*markdown_table(table), ""]
            targets = payload.get("targets")
            # {name: {value, target, met, of}} gets its own table; a result that keeps its targets as plain
            # bounds (train_hf) already shows them in one of its tables
            if targets and all(isinstance(goal, dict) for goal in targets.values()):
                lines += [*markdown_table(targets_table(targets)), ""]
            png = result["_path"].with_suffix(".png")
            if png.is_file():
                lines += [f"![{name} on {result['device']}]({Path(os.path.relpath(png, readme_dir)).as_posix()})", ""]
    return "\n".join(lines).rstrip()


def replace_section(text: str, body: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START} ... {END} section to fill")
    return text[: start + len(START)] + "\n" + body + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results", help="directory of result JSON files")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "docs" / "benchmarks.md",
                        help="the page to rewrite (its bench:start/bench:end section)")
    args = parser.parse_args(argv)
    readme = args.readme.resolve()
    body = render(load_results(args.results), readme.parent)
    try:
        readme.write_text(replace_section(readme.read_text(), body))
    except ValueError as exc:
        parser.error(f"{readme}: {exc}")
    print(f"updated {readme} from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
