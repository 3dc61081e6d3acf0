"""Input files read by every command: a TOML file into a dict, or one line naming the file and what is
wrong with it (``UsageError``: exit 2). The counterpart of :mod:`ipc.outputs`."""

from __future__ import annotations

import tomllib
from typing import Any

from ipc.errors import UsageError


def read_toml(path: str, where: str) -> dict[str, Any]:
    """The parsed TOML of ``path``; ``where`` names it in the error ("grid file g.toml")."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{where}: not found") from None
    except IsADirectoryError:
        raise UsageError(f"{where}: is a directory") from None
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: invalid TOML: {e}".splitlines()[0]) from None
