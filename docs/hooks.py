"""MkDocs hooks (mkdocs.yml `hooks:`): two pages are written at build time, never committed, so
neither can drift from what it describes.

- `index.md`, the site's home page: the repository's README.md, its `docs/...` links made relative
  to the site (the README is the front door on GitHub and on the site alike).
- `reference/cli.md`: every command, sub-command and flag of `sftdpo`, with its help, its choices and
  its default, from the argparse parser the command line itself uses (`sftdpo.cli.build_parser`).

tests/test_docs.py imports `cli_reference` from here to check the page against the parser.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80  # usage lines wrapped at a fixed width, whatever the terminal that builds the site


def _parser() -> argparse.ArgumentParser:
    if str(ROOT / "src") not in sys.path:  # the checkout's own code, installed or not
        sys.path.insert(0, str(ROOT / "src"))
    from sftdpo.cli import build_parser

    return build_parser()


def _escape(text: str) -> str:
    """Markdown-safe help text: `<...>` is not HTML and `*` is not emphasis, except inside backticks."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")
                   for p in parts)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the order `--help` lists them."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    fmt = argparse.HelpFormatter(parser.prog, width=WIDTH)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return fmt.format_help().strip()


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Markdown for each argument group of `parser`: a heading, then one item per argument."""
    fmt = argparse.HelpFormatter(parser.prog, width=WIDTH)
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
        if not actions:
            continue
        lines += ["", f"**{group.title}**", ""]
        for a in actions:
            invocation = fmt._format_action_invocation(a)
            helptext = fmt._expand_help(a) if a.help else ""
            lines.append(f"- `{invocation}`" + (f": {_escape(' '.join(helptext.split()))}" if helptext else ""))
    return lines


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The command-line reference page: each (sub-)command's usage and every argument with its help."""
    parser = parser or _parser()
    out = ["# Command-line reference", "",
           "Every command and flag of `sftdpo`, generated from the command line's own parser "
           "(`sftdpo.cli.build_parser`) each time this site is built, so it says what the installed "
           "version accepts. `sftdpo COMMAND --help` prints the same in a terminal.",
           "", "```text", _usage(parser), "```"]
    out += _arguments(parser)

    def walk(p: argparse.ArgumentParser, help_: str, level: int) -> None:
        out.extend(["", f"{'#' * level} `{p.prog}`", ""])
        if help_:
            out.extend([_escape(help_[0].upper() + help_[1:]) + ".", ""])
        out.extend(["```text", _usage(p), "```"])
        subs = _subcommands(p)
        out.extend(_arguments(p))
        for name, h, sp in subs:
            walk(sp, h, min(level + 1, 4))

    for name, h, sp in _subcommands(parser):
        walk(sp, h, 2)
    return "\n".join(out) + "\n"


def home_page(readme: str) -> str:
    """README.md as the site's home page: links into docs/ become links between site pages."""
    return re.sub(r"\]\(docs/", "](", readme)


def on_files(files, config):  # noqa: ANN001 - MkDocs' hook signature
    from mkdocs.structure.files import File

    for uri, text in (("index.md", home_page((ROOT / "README.md").read_text(encoding="utf-8"))),
                      ("reference/cli.md", cli_reference())):
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, uri, content=text))
    return files
