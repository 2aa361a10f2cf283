"""Which code computed a result: the package version, a hash of its sources, and in a git checkout the commit and
whether (and how) the working tree differs from it. Analyses record it in run.json and key their caches on the
source hash, so a cached number can never outlive the code that made it.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # asff_viz/, not asff_viz/utils/


def _git(*arguments: str) -> str | None:
    try:
        completed = subprocess.run(["git", "-C", str(PACKAGE_ROOT.parent), *arguments], capture_output=True,
                                   text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout if completed.returncode == 0 else None


def source_files() -> list[Path]:
    """Every Python source of the package, sorted: what `source_sha256` hashes."""
    return sorted(PACKAGE_ROOT.rglob("*.py"))


@lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 over the package's Python sources (path and content of each): what computed a cached result.

    Unlike the commit, it changes only when the code does (not with every documentation commit), and it
    exists outside a checkout too.
    """
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_identity() -> dict:
    """{"package", "source_sha256", "git_sha", "dirty", "diff_sha256"}: the git fields are None outside a
    checkout.

    `diff_sha256` hashes the uncommitted changes to the package (`git diff HEAD -- asff_viz`), so two different
    uncommitted edits of the same commit are two identities.
    """
    from .. import __version__

    identity = {"package": __version__, "source_sha256": source_sha256(), "git_sha": None, "dirty": None,
                "diff_sha256": None}
    inside = _git("rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != "true":
        return identity
    sha = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD", "--", str(PACKAGE_ROOT))
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", str(PACKAGE_ROOT))
    if sha is None or diff is None:
        return identity
    changes = diff + (untracked or "")
    identity.update(git_sha=sha.strip(), dirty=bool(changes.strip()),
                    diff_sha256=hashlib.sha256(changes.encode()).hexdigest() if changes.strip() else None)
    return identity
