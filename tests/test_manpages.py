"""Man pages: one per installed command, current with each command's usage text, and valid troff."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_command_has_a_man_page_installed_with_it() -> None:
    cfg = setup_cfg()
    commands = {os.path.basename(s) for s in cfg["options"]["scripts"].split()}
    pages = {os.path.basename(p)[: -len(".1")] for p in cfg["options.data_files"]["share/man/man1"].split()}
    assert commands == pages
    for page in pages:
        assert (ROOT / "man" / f"{page}.1").is_file()


def test_the_pages_are_current_with_the_usage_texts() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "make-manpages"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man (man-db) is not installed")
def test_the_pages_render_without_warnings() -> None:
    for page in sorted((ROOT / "man").glob("*.1")):
        done = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                              env=dict(os.environ, MANWIDTH="80"), timeout=60)
        assert done.returncode == 0 and done.stderr == "", (page.name, done.stderr)
        text = re.sub(".\x08", "", done.stdout)  # overstrike (bold) to plain text
        assert "SYNOPSIS" in text and "OPTIONS" in text, page.name
