"""The Makefile: what callers type is passed on quoted, and `make help` lists every target.

The seat targets run for real (`make patient ...`): the peers refuse a bad
session id before connecting anywhere, so no relay is needed. ``-o setup``
keeps make from reinstalling the virtualenv (the stamp is not what is tested).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent


def make(*args: str) -> subprocess.CompletedProcess[str]:
    # A fresh make: not the variables of a make that runs this suite (`make test
    # ARGS=...` hands its command-line variables down through MAKEFLAGS).
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    return subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        check=False,
    )


HOSTILE = {
    "semicolon": "x;touch {marker}",
    "command-substitution": "$(touch {marker})",
    "backquotes": "`touch {marker}`",
    "quote-then-command": "a';touch {marker};'",
    "make-function": "$(shell touch {marker})",
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_session_runs_nothing_and_gets_the_peers_error(
    tmp_path: Path, template: str
) -> None:
    """A SESSION holding shell or make code runs none of it: the peer refuses the id in one line."""
    marker = tmp_path / "pwned"
    session = template.format(marker=marker)
    result = make("patient", f"SESSION={session}")
    assert not marker.exists(), "the Makefile ran what SESSION held"
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
    assert lines == [
        f"patient: --session: expected 1-64 characters of A-Z a-z 0-9 _ -, got {session!r}"
    ]


def test_session_with_a_space_gets_the_peers_error_not_argparse() -> None:
    """SESSION='bad id!' reaches the peer as one value and gets its one-line error."""
    result = make("practitioner", "SESSION=bad id!")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "practitioner: --session: expected 1-64 characters of A-Z a-z 0-9 _ -, got 'bad id!'"
    )
    assert "usage:" not in result.stderr


def test_hostile_args_are_words_not_commands(tmp_path: Path) -> None:
    """ARGS is split into words, each passed quoted: a ';' in it starts no command."""
    marker = tmp_path / "pwned"
    result = make("patient", "SESSION=ok", f"ARGS=--duration 1;touch {marker}")
    assert not marker.exists()
    assert result.returncode == 2
    assert "argument --duration: invalid float value: '1;touch'" in result.stderr


def test_recipes_pass_user_variables_only_quoted() -> None:
    """No recipe line uses $(ARGS), $(SESSION), $(CONFIG) raw: only their quoted forms."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipes = [line for line in makefile.splitlines() if line.startswith("\t")]
    raw = [line for line in recipes if re.search(r"\$[({](ARGS|SESSION|CONFIG)[)}]", line)]
    assert raw == []


def test_help_lists_every_target_once() -> None:
    """`make help` has one line per documented target, and every public target is documented."""
    result = make("help")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0].rstrip(",") for line in result.stdout.splitlines()]
    assert len(listed) == len(set(listed))
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = re.search(r"^\.PHONY: (.*)$", makefile, re.M)
    assert phony is not None
    internal = {"apt-nodejs", "apt-systemd", "practitioner"}  # helpers; listed with patient
    for target in set(phony.group(1).split()) - internal:
        assert target in listed, f"{target} has no '## {target}: ...' line"
    assert re.search(r"^  patient, practitioner +one seat", result.stdout, re.M)
