"""Where local state and local-dev tooling live, found from the working directory.

The installed package holds what runs in production (the worker) and the client. The local stack
and the demo belong to a source checkout (``deploy/local/``): the `embedfleet stack` and
`embedfleet demo` commands find that checkout from the directory they are run in, so they work the
same from an editable or a regular ``pip install .``. Inside a checkout, state (stack data, model
bundles) lives in ``<checkout>/.state``, where the Makefile keeps it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HOME_ENV = "EMBEDFLEET_HOME"
MARKER = Path("deploy") / "local" / "stack.py"


def find_checkout(start: Path | None = None) -> Path | None:
    """The embedfleet source checkout holding ``start`` (default: the working directory), or None."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        pyproject = directory / "pyproject.toml"
        if (
            (directory / MARKER).is_file()
            and pyproject.is_file()
            and 'name = "embedfleet"' in pyproject.read_text(errors="replace")
        ):
            return directory
    return None


def default_home() -> Path:
    """$EMBEDFLEET_HOME; else ``.state`` of the checkout the command runs in (as under make);
    else ~/.cache/embedfleet."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured)
    checkout = find_checkout()
    return checkout / ".state" if checkout is not None else Path.home() / ".cache" / "embedfleet"


def run_checkout_script(script: str, argv: list[str], what: str) -> int:
    """Runs ``deploy/local/<script>`` of the checkout with this Python (so it sees this install),
    with EMBEDFLEET_HOME set to the state directory this command would use."""
    checkout = find_checkout()
    if checkout is None:
        print(
            f"error: {what} runs from a source checkout of embedfleet, and {Path.cwd()} is not in "
            "one: cd into your clone (git clone ...; cd embedfleet) and run it again",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ, **{HOME_ENV: str(default_home())})
    return subprocess.call([sys.executable, str(checkout / "deploy" / "local" / script), *argv], env=env)
