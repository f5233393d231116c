"""Write one benchmark's table into its own section of docs/benchmarks.md.

Each script owns the text between `<!-- begin NAME -->` and `<!-- end NAME -->`;
rerunning a script replaces only its section.
"""
from __future__ import annotations

import platform
import re
import shlex
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every table below is written by a script in `benchmarks/`; the command that
produced it, the machine and the torch version head each section. Rerun the
command to refresh the section.
"""


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def command() -> str:
    return "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])


def write_section(name: str, title: str, body: str) -> Path:
    text = DOC.read_text() if DOC.exists() else HEADER
    section = (f"<!-- begin {name} -->\n## {title}\n\n`{command()}`\n\nMachine: {machine()}.\n\n"
               f"{body.strip()}\n<!-- end {name} -->")
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    return DOC
