"""Run the real ESO pipeline (EsoRex + the MUSE plugins) as a reference.

Used by the comparison tests and the benchmarks: the same inputs go through
ESO's recipe and through ours.  Nothing here is needed to reduce data.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/cpl/plugins", "/usr/lib/aarch64-linux-gnu/cpl/plugins")

_LOG_LINE = re.compile(r"^\s*\d\d:\d\d:\d\d\s+\[\s*(?P<level>\w+)\s*\]\s+(?P<text>.*)$")


def esorex_path() -> str | None:
    """The esorex executable, or None where ESO's pipeline is not installed."""
    return shutil.which("esorex")


def plugin_dir() -> str | None:
    for candidate in PLUGIN_DIRS:
        if os.path.isdir(candidate):
            return candidate
    return None


@dataclass
class EsoRun:
    """Outcome of one esorex call."""

    recipe: str
    returncode: int
    output_dir: Path
    log: str
    wall_time: float
    max_rss_kb: int
    messages: list[tuple[str, str]] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [text for level, text in self.messages if level == "WARNING"]

    @property
    def errors(self) -> list[str]:
        return [text for level, text in self.messages if level == "ERROR"]

    def product(self, name: str) -> Path:
        path = self.output_dir / name
        if not path.exists():
            raise FileNotFoundError(f"esorex {self.recipe} wrote no {name} (exit {self.returncode})")
        return path


def run_esorex(
    recipe: str,
    sof: str | os.PathLike,
    output_dir: str | os.PathLike,
    params: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> EsoRun:
    """Run ``esorex recipe --param=value ... sof`` writing into ``output_dir``."""
    exe = esorex_path()
    if exe is None:
        raise RuntimeError("esorex is not installed (apt-get install esorex cpl-plugin-muse)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "esorex.log"
    command = [exe, "--log-level=debug", f"--log-dir={out}", "--log-file=esorex.log",
               f"--output-dir={out}", "--suppress-prefix=TRUE"]
    directory = plugin_dir()
    if directory:
        command.append(f"--recipe-dir={directory}")
    command.append(recipe)
    for name, value in (params or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        command.append(f"--{name}={value}")
    command.append(str(Path(sof).resolve()))
    run_env = dict(os.environ)
    run_env.update(env or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=out, env=run_env, capture_output=True, text=True,
                               timeout=timeout)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    log = log_file.read_text(errors="replace") if log_file.exists() else completed.stdout
    messages = []
    for line in log.splitlines():
        match = _LOG_LINE.match(line)
        if match:
            messages.append((match["level"].upper(), match["text"]))
    return EsoRun(recipe, completed.returncode, out, log + completed.stderr, wall,
                  max(rss, before), messages)
