"""Files the package ships beside its code: DeepSpeed configs, experiment configs, lm-eval task YAMLs.

They live at the top of the repository (``ds_configs/``, ``configs/``, ``eval/``), where users read and edit
them; ``sift_llm/shipped/`` links to them, and a built wheel copies them in as package data, so an
installed ``sift-llm`` (``pip install .``, not editable) finds them without a checkout.
"""

from __future__ import annotations

from pathlib import Path

from sift_llm.errors import UserError

SHIPPED = Path(__file__).parent / "shipped"


def shipped(relative: str | Path) -> Path:
    """The shipped file or directory ``relative`` (e.g. ``ds_configs/zero2.json``, ``eval/heldout``)."""
    return SHIPPED / relative


def locate(path: str | Path, what: str) -> Path:
    """``path`` as given (absolute, or relative to the working directory), else the shipped file of that name.

    So ``ds_configs/zero2.json`` or ``configs/demo.yaml`` work from any directory, in a checkout or installed.
    """
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    if not candidate.is_absolute() and shipped(candidate).is_file():
        return shipped(candidate)
    raise UserError(f"{what}: no such file {str(path)!r} (looked in {Path.cwd()} and among the shipped files)")
