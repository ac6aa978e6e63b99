"""Every code block of README.md runs as written, against a `mlip serve` the test starts.

Blocks run in order in a scratch folder that mirrors the repository (so relative paths such as
``examples/aspirin.xyz`` work and nothing is written into the checkout). The only change made to a
block is the server address: ``127.0.0.1:8000`` / ``localhost:8000`` become the test server's.
A block that cannot run here says so in the README, on the line before it:
``<!-- test: skip REASON -->``, or ``<!-- test: needs MODULE -->`` to skip when MODULE is absent.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .serverproc import ServerProcess, one_torch_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- test: (?P<directive>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


@dataclass
class Block:
    index: int
    lang: str
    code: str
    directive: str | None

    @property
    def skip_reason(self) -> str | None:
        if self.directive is None:
            return None
        kind, _, rest = self.directive.partition(" ")
        if kind == "skip":
            return rest
        if kind == "needs":
            return None if importlib.util.find_spec(rest) else f"{rest} is not installed"
        raise ValueError(f"README block {self.index}: unknown test directive {self.directive!r}")


def readme_blocks() -> list[Block]:
    return [Block(i, m["lang"], m["code"], m["directive"]) for i, m in enumerate(BLOCK.finditer((REPO / "README.md").read_text()))]


def test_every_block_is_runnable_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for block in blocks:
        assert block.lang in ("python", "bash"), f"block {block.index}: say python or bash"
        block.skip_reason  # noqa: B018  (unknown directives raise)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The repository's top level as symlinks, except examples/ (copied: blocks write there)."""
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name == "examples":
            shutil.copytree(entry, root / entry.name)
        elif not entry.name.startswith("."):
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="module")
def server(scratch):
    with ServerProcess([], scratch / "serve.log") as process:  # plain `mlip serve`: every shipped potential
        yield process


@pytest.mark.parametrize("block", readme_blocks(), ids=lambda b: f"block{b.index}-{b.lang}")
def test_readme_block(block: Block, scratch: Path, request):
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    code = block.code
    if re.search(r"(127\.0\.0\.1|localhost):8000", code):
        url = request.getfixturevalue("server").url
        code = re.sub(r"http://(127\.0\.0\.1|localhost):8000", url, code)
        code = re.sub(r"\b(127\.0\.0\.1|localhost):8000", url.removeprefix("http://"), code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    out = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README block {block.index} failed:\n{code}\n--- output ---\n{out.stdout[-3000:]}{out.stderr[-3000:]}"


@pytest.mark.parametrize("script, args", [
    ("relax_silicon_remote.py", ["--repeat", "1", "--steps", "5"]),  # needs si-zuo2020: served by default
    ("md_aspirin_remote.py", ["--steps", "5"]),
])
def test_examples_run_against_a_plain_server(server, scratch, script, args):
    out = subprocess.run([sys.executable, str(scratch / "examples" / script), "--url", server.url, *args], cwd=scratch,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
